-- Take back items of one job whose lease has expired (their worker died or stalled).
-- Bumps each item's epoch first, so the old holder's late commit is refused, then frees it.
-- A loss counts against an item only if its call had started under the lost epoch (an item
-- merely waiting in a dead worker is innocent) and the lease was not released on purpose
-- (score 0, graceful shutdown) or already counted (score 1, taken back but not yet requeued).
-- KEYS: meta, results, epochs, running, leases, lost, calling
-- ARGV: job_id, now_ms, index...
-- Returns a flat list {index, losses with the call started, all losses, isolated, suspect, ...}
-- of items to run again; isolated is 1 when the lost run was the item's isolated run (see
-- claim.lua) and its call had started, 2 when it was lost before its call was recorded, else 0;
-- suspect is 1 when the item may run only isolated from now on.
local results, epochs, running, leases, lost, calling = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local job_id, now_ms = ARGV[1], tonumber(ARGV[2])
local taken = {}
for i = 3, #ARGV do
  local index = ARGV[i]
  local member = job_id .. ':' .. index
  local expiry = redis.call('ZSCORE', leases, member)
  if expiry and tonumber(expiry) <= now_ms then
    if redis.call('HEXISTS', results, index) == 1 then
      redis.call('ZREM', leases, member)
    else
      -- Score 1: taken back, awaiting its requeue. If the reaper dies before it requeues, the
      -- next pass finds the item again; the reaper drops these entries once it has requeued.
      redis.call('ZADD', leases, 1, member)
      local epoch = redis.call('HINCRBY', epochs, index, 1) - 1
      local was_calling = tonumber(redis.call('HGET', calling, index) or '-1') == epoch
      local isolated = tonumber(redis.call('HGET', lost, index .. ':isolated') or '-1') == epoch
      redis.call('HDEL', running, index)
      local losses = tonumber(redis.call('HGET', lost, index) or '0')
      local any_losses = tonumber(redis.call('HGET', lost, index .. ':any') or '0')
      if tonumber(expiry) > 1 then
        any_losses = redis.call('HINCRBY', lost, index .. ':any', 1)
        if was_calling then
          losses = redis.call('HINCRBY', lost, index, 1)
        end
      end
      taken[#taken + 1] = index
      taken[#taken + 1] = losses
      taken[#taken + 1] = any_losses
      local isolated_loss = 0
      if isolated and tonumber(expiry) > 1 then
        isolated_loss = was_calling and 1 or 2
      end
      taken[#taken + 1] = isolated_loss
      taken[#taken + 1] = redis.call('HEXISTS', lost, index .. ':suspect')
    end
  end
end
return taken
