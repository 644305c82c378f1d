-- Settle items of one job: the only way a result is ever written.
-- An item is refused when it is already settled, or (unless forced) when the epoch it was
-- claimed under is no longer the newest. When the batch settles the last item, the job is
-- marked finished (or cancelled) and job.completed is appended, exactly once.
-- KEYS: meta, results, epochs, running, job_events, global_events, notify_channel
-- ARGV: job_id, global_maxlen, force ("1" skips the epoch check), then per item:
--       index, epoch, status, record_json
-- Returns {committed, refused, job_finished (0|1), landed} where landed has one char per item:
-- '1' committed, '0' refused.
local meta, results, epochs, running = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_events, global_events, notify = KEYS[5], KEYS[6], KEYS[7]
local job_id, maxlen, force = ARGV[1], ARGV[2], ARGV[3] == '1'

local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)

local committed, refused = 0, 0
local landed = {}
for i = 4, #ARGV, 4 do
  local index, epoch, status, record = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local stale = (not force) and redis.call('HGET', epochs, index) ~= epoch
  if stale or redis.call('HEXISTS', results, index) == 1 then
    refused = refused + 1
    landed[#landed + 1] = '0'
  else
    redis.call('HSET', results, index, record)
    redis.call('HDEL', running, index)
    redis.call('HINCRBY', meta, status, 1)
    redis.call('XADD', job_events, '*', 'type', 'item.settled', 'job_id', job_id, 'index', index,
      'status', status)
    redis.call('XADD', global_events, 'MAXLEN', '~', maxlen, '*', 'type', 'item.settled',
      'job_id', job_id, 'index', index, 'status', status)
    committed = committed + 1
    landed[#landed + 1] = '1'
  end
end
if refused > 0 then
  redis.call('HINCRBY', meta, 'refused_commits', refused)
end

local finished = 0
if committed > 0 then
  local m = redis.call('HMGET', meta, 'total', 'succeeded', 'failed', 'cancelled', 'state',
    'cancel_requested')
  local total = tonumber(m[1]) or 0
  local settled = (tonumber(m[2]) or 0) + (tonumber(m[3]) or 0) + (tonumber(m[4]) or 0)
  if settled >= total and m[5] ~= 'finished' and m[5] ~= 'cancelled' then
    local final = m[6] and 'cancelled' or 'finished'
    redis.call('HSET', meta, 'state', final, 'finished_at_ms', now_ms)
    local fields = {'type', 'job.completed', 'job_id', job_id, 'state', final, 'total', m[1],
      'succeeded', m[2] or '0', 'failed', m[3] or '0', 'cancelled', m[4] or '0'}
    redis.call('XADD', job_events, '*', unpack(fields))
    redis.call('XADD', global_events, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    finished = 1
  end
  redis.call('PUBLISH', notify, committed)
end
return {committed, refused, finished, table.concat(landed)}
