-- Take a handoff's receipt, or say who has it. KEYS[1] the receipt hash.
-- ARGV: owner, now_ms, lease_ms, envelope JSON, keep_ms.
-- Returns {"completed", result} | {"processing", until_ms} | {"begun", ""}.
local status = redis.call('HGET', KEYS[1], 'status')
local now = tonumber(ARGV[2])
if status == 'completed' then
  return {'completed', redis.call('HGET', KEYS[1], 'result')}
end
if status == 'processing' then
  local until_ms = tonumber(redis.call('HGET', KEYS[1], 'until_ms'))
  if until_ms > now then
    return {'processing', tostring(until_ms)}
  end
  -- the receiver that had it stopped renewing (it died): this one takes it over
end
redis.call('HSET', KEYS[1], 'status', 'processing', 'owner', ARGV[1],
  'until_ms', tostring(now + tonumber(ARGV[3])), 'envelope', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'begun', ''}
