-- Take back items of one job whose lease has expired (their worker died or stalled).
-- Bumps each item's epoch first, so the old holder's late commit is refused, then frees it.
-- A loss counts against an item only if its call had started under the lost epoch (an item
-- merely waiting in a dead worker is innocent) and the lease was not released on purpose
-- (score 0, graceful shutdown).
-- KEYS: meta, results, epochs, running, leases, lost, calling
-- ARGV: job_id, now_ms, index...
-- Returns a flat list {index, losses, ...} of items to run again.
local results, epochs, running, leases, lost, calling = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local job_id, now_ms = ARGV[1], tonumber(ARGV[2])
local taken = {}
for i = 3, #ARGV do
  local index = ARGV[i]
  local member = job_id .. ':' .. index
  local expiry = redis.call('ZSCORE', leases, member)
  if expiry and tonumber(expiry) <= now_ms then
    redis.call('ZREM', leases, member)
    if redis.call('HEXISTS', results, index) == 0 then
      local epoch = redis.call('HINCRBY', epochs, index, 1) - 1
      local was_calling = tonumber(redis.call('HGET', calling, index) or '-1') == epoch
      redis.call('HDEL', running, index)
      local losses = 0
      if tonumber(expiry) > 0 and was_calling then
        losses = redis.call('HINCRBY', lost, index, 1)
      else
        losses = tonumber(redis.call('HGET', lost, index) or '0')
      end
      taken[#taken + 1] = index
      taken[#taken + 1] = losses
    end
  end
end
return taken
