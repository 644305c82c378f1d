-- Renew, complete or give up a receipt, only while this owner still holds it.
-- KEYS[1] the receipt hash. ARGV: owner, action (renew | complete | release), now_ms, lease_ms, result.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'processing' then
  return 0
end
local action = ARGV[2]
if action == 'renew' then
  redis.call('HSET', KEYS[1], 'until_ms', tostring(tonumber(ARGV[3]) + tonumber(ARGV[4])))
elseif action == 'complete' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'result', ARGV[5])
  redis.call('HDEL', KEYS[1], 'until_ms')
else
  redis.call('DEL', KEYS[1])
end
return 1
