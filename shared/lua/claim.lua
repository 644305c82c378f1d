-- Claim items of one job for a worker, skipping settled ones.
-- Each claim bumps the item's fencing epoch; only a commit carrying the newest epoch lands.
-- KEYS: meta, items, results, epochs, running, job_events, global_events
-- ARGV: worker, global_maxlen, index...
-- Returns a flat list {index, epoch, item_json, ...}; {-1} when the job does not exist.
local meta, items, results, epochs, running = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local state = redis.call('HGET', meta, 'state')
if not state then
  return {-1}
end
if state == 'finished' or state == 'cancelled' or redis.call('HGET', meta, 'cancel_requested') then
  return {}
end
if state == 'pending' then
  local now = redis.call('TIME')
  local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
  redis.call('HSET', meta, 'state', 'running', 'started_at_ms', now_ms)
  local job_id = redis.call('HGET', meta, 'job_id')
  redis.call('XADD', KEYS[6], '*', 'type', 'job.started', 'job_id', job_id, 'at_ms', now_ms)
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[2], '*', 'type', 'job.started', 'job_id', job_id,
    'at_ms', now_ms)
  if redis.call('HGET', meta, 'state_mode') == 'log' then
    redis.call('HINCRBY', meta, 'unsnapshotted', 1)
  end
end
local claimed = {}
for i = 3, #ARGV do
  local index = ARGV[i]
  if redis.call('HEXISTS', results, index) == 0 then
    local spec = redis.call('HGET', items, index)
    if spec then
      local epoch = redis.call('HINCRBY', epochs, index, 1)
      redis.call('HSET', running, index, ARGV[1])
      claimed[#claimed + 1] = index
      claimed[#claimed + 1] = epoch
      claimed[#claimed + 1] = spec
    end
  end
end
return claimed
