-- Claim items of one job for a worker: take a lease and a fencing epoch on each.
-- Skips items that are settled, and items whose lease is still live, whoever holds it: a
-- redelivered message (broker backstop) must never run an item twice or fence a live run. Each claim bumps the item's epoch; only a commit carrying
-- the newest epoch lands, so a worker whose lease was taken over cannot write.
-- An item the reaper has marked a suspect ("INDEX:suspect" in lost) is claimed only by an
-- isolated claim (the suspect run alone, see reaper.py): a redelivered old message must not run
-- it among others again. An isolated claim records its epoch in lost as "INDEX:isolated", so that
-- the loss of exactly this run is what makes the item poison.
-- A job's reduce is claimed like an item, at index = total, once the commit of its last item made
-- it ready.
-- An item still waiting for needs (waiting > 0) is not claimed.
-- KEYS: meta, items, results, epochs, running, job_events, global_events, leases, lost, waiting
-- ARGV: worker, global_maxlen, lease_ms, isolated ("1" or "0"), index...
-- Returns a flat list {index, epoch, item_json, ...}; {-1} when the job does not exist.
local meta, items, results, epochs, running = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local leases = KEYS[8]
local worker, lease_ms, isolated = ARGV[1], tonumber(ARGV[3]), ARGV[4] == '1'
local state = redis.call('HGET', meta, 'state')
if not state then
  return {-1}
end
if state == 'finished' or state == 'cancelled' then
  return {}
end
-- A job's reduce (index = total, when it has one) may run only once every item has settled, and
-- still runs after a cancel (unless cancelled with it: cancel_reduce); nothing else does after a
-- cancel.
local job = redis.call('HMGET', meta, 'total', 'reduce_server', 'cancel_requested', 'cancel_reduce')
local reduce_index = job[2] and not job[4] and job[1]
local cancelled = job[3]
if cancelled and not reduce_index then
  return {}
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local job_id = redis.call('HGET', meta, 'job_id')
if state == 'pending' then
  redis.call('HSET', meta, 'state', 'running', 'started_at_ms', now_ms)
  redis.call('XADD', KEYS[6], '*', 'type', 'job.started', 'job_id', job_id, 'at_ms', now_ms)
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[2], '*', 'type', 'job.started', 'job_id', job_id,
    'at_ms', now_ms)
  if redis.call('HGET', meta, 'state_mode') == 'log' then
    redis.call('HINCRBY', meta, 'unsnapshotted', 1)
  end
end
local claimed = {}
for i = 5, #ARGV do
  local index = ARGV[i]
  local member = job_id .. ':' .. index
  local free = redis.call('HEXISTS', results, index) == 0
  if free and tonumber(redis.call('HGET', KEYS[10], index) or '0') > 0 then
    free = false
  end
  if index == reduce_index then
    free = free and redis.call('HEXISTS', meta, 'reduce_ready_at_ms') == 1
  elseif cancelled then
    free = false
  end
  if free and not isolated and redis.call('HEXISTS', KEYS[9], index .. ':suspect') == 1 then
    free = false
  end
  if free then
    local expiry = tonumber(redis.call('ZSCORE', leases, member) or '0')
    if expiry > now_ms and redis.call('HEXISTS', running, index) == 1 then
      free = false
    end
  end
  if free then
    local spec = redis.call('HGET', items, index)
    if spec then
      local epoch = redis.call('HINCRBY', epochs, index, 1)
      redis.call('HSET', running, index, worker .. ' ' .. epoch .. ' ' .. now_ms)
      redis.call('ZADD', leases, now_ms + lease_ms, member)
      if isolated then
        redis.call('HSET', KEYS[9], index .. ':isolated', epoch)
      end
      claimed[#claimed + 1] = index
      claimed[#claimed + 1] = epoch
      claimed[#claimed + 1] = spec
    end
  end
end
return claimed
