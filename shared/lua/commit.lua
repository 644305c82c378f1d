-- Settle items of one job: the only way a result is ever written.
-- An item is refused when it is already settled, or (unless forced) when the epoch it was
-- claimed under is no longer the newest. When the batch settles the last item, the job is
-- marked finished (or cancelled) and job.completed is appended, exactly once.
-- State modes: 'cas' moves the counters of the job record (and its version) in place;
-- 'log' only appends item.settled events, whose fold is the job view (see jobview.py).
-- Pipeline items: a settled item's step checkpoints are dropped (its record carries the steps);
-- a degraded success and a failure (by step and error type) are counted for the job's status.
-- A job with a reduce (meta 'reduce_server' set) has one more unit at index = total: when the
-- batch settles the last item, the reduce's chunk is recorded as outstanding and returned (the
-- caller enqueues it), and the job finishes only when the reduce itself settles. The reduce
-- moves no item counters; its event is reduce.settled.
-- KEYS: meta, results, epochs, running, job_events, global_events, notify_channel, leases, active_jobs,
--       failures, steps, chunks, items, waiting, dependents, backlogged_jobs, expiring_jobs, then
--       every key of the job (JobKeys.all)
-- Retention: the commit that ends the job also sets the expiry (meta 'ttl_s' seconds from now, 0
-- keeps it) of every key of the job and of its idempotency key (meta 'idempotency_key', the one
-- key named by a field), and lists the job in expiring_jobs for the reaper to drop from the jobs
-- index. A job that no longer exists (expired, or deleted while a worker held its items) refuses
-- every commit and writes nothing, so a late result cannot bring back a part of it.
-- Items with needs: settling an item counts down its dependents' waiting needs; a dependent whose
-- last need settled (however it ended) is recorded as an outstanding chunk and returned in ready
-- (the caller enqueues it; the worker that claims it fails it if a need did not succeed).
-- ARGV: job_id, global_maxlen, force ("1" skips the epoch check), then per item:
--       index, epoch, status, record_json, degraded ("1" or ""), failure ('["STEP","TYPE"]' or ""),
--       checkpointed step names (space-separated, or "")
-- Returns {committed, refused, job_finished (0|1), landed, unsnapshotted, reduce_chunk}; landed has
-- one char per item ('1' committed, '0' refused); unsnapshotted counts log events since the
-- snapshot; reduce_chunk is the reduce's chunk (JSON) when this batch made it ready, else '';
-- ready lists the chunks (JSON) of dependents this batch made ready.
local meta, results, epochs, running = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_events, global_events, notify, leases = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local job_id, maxlen, force = ARGV[1], ARGV[2], ARGV[3] == '1'

if redis.call('EXISTS', meta) == 0 then
  local items = (#ARGV - 3) / 7
  return {0, items, 0, string.rep('0', items), 0, '', {}}
end
local log_mode = redis.call('HGET', meta, 'state_mode') == 'log'

-- The log is the state in log mode and is trimmed by snapshots; in cas mode it is a bounded feed.
local function append(fields)
  if log_mode then
    redis.call('XADD', job_events, '*', unpack(fields))
  else
    redis.call('XADD', job_events, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
  redis.call('XADD', global_events, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end

local job = redis.call('HMGET', meta, 'total', 'reduce_server')
local total_items, reduce_server = job[1], job[2]

local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)

local committed, refused = 0, 0
local landed = {}
local ready = {}

local ready_by_server = {}
local ready_servers = {}

local has_dependents = redis.call('EXISTS', KEYS[15]) == 1

-- Count down the dependents of a settled item; those whose last need this was are ready.
local function release_dependents(index)
  if not has_dependents then
    return
  end
  local dependents = redis.call('HGET', KEYS[15], index)
  if not dependents then
    return
  end
  for dependent in string.gmatch(dependents, '%S+') do
    local left = redis.call('HINCRBY', KEYS[14], dependent, -1)
    if left <= 0 and redis.call('HEXISTS', results, dependent) == 0 then
      local server = cjson.decode(redis.call('HGET', KEYS[13], dependent)).server or ''
      if not ready_by_server[server] then
        ready_by_server[server] = {}
        ready_servers[#ready_servers + 1] = server
      end
      local waiting = ready_by_server[server]
      waiting[#waiting + 1] = tonumber(dependent)
    end
  end
end

-- The ended job expires whole: every key of it (those of KEYS[18] on under its hash tag), its
-- idempotency key, its index entries.
local function retire()
  redis.call('SREM', KEYS[16], job_id)
  local ttl_s = tonumber(redis.call('HGET', meta, 'ttl_s') or '0') or 0
  if ttl_s <= 0 then
    return
  end
  local expires_at = now_ms + ttl_s * 1000
  redis.call('HSET', meta, 'expires_at_ms', expires_at)
  local tag = '{' .. job_id .. '}'
  for k = 18, #KEYS do
    if string.find(KEYS[k], tag, 1, true) then
      redis.call('PEXPIREAT', KEYS[k], expires_at)
    end
  end
  local idempotency_key = redis.call('HGET', meta, 'idempotency_key')
  if idempotency_key and redis.call('GET', idempotency_key) == job_id then
    redis.call('PEXPIREAT', idempotency_key, expires_at)
  end
  redis.call('ZADD', KEYS[17], expires_at, job_id)
end

-- The ready items as chunks of the job's chunk size, recorded as outstanding.
local function ready_chunks()
  local size = tonumber(redis.call('HGET', meta, 'chunk_size') or '50')
  for _, server in ipairs(ready_servers) do
    local indexes = ready_by_server[server]
    for start = 1, #indexes, size do
      local items = {}
      for i = start, math.min(start + size - 1, #indexes) do
        items[#items + 1] = indexes[i]
      end
      local id = job_id .. '-ready-' .. items[1]
      local chunk = cjson.encode({job_id = job_id, server = server, items = items, id = id})
      redis.call('HSET', KEYS[12], id, chunk)
      ready[#ready + 1] = chunk
    end
  end
end

for i = 4, #ARGV, 7 do
  local index, epoch, status, record = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local degraded, failure, checkpointed = ARGV[i + 4] == '1', ARGV[i + 5], ARGV[i + 6]
  local stale = (not force) and redis.call('HGET', epochs, index) ~= epoch
  if stale or redis.call('HEXISTS', results, index) == 1 then
    refused = refused + 1
    landed[#landed + 1] = '0'
  else
    redis.call('HSET', results, index, record)
    redis.call('HDEL', running, index)
    redis.call('ZREM', leases, job_id .. ':' .. index)
    for name in string.gmatch(checkpointed, '%S+') do
      redis.call('HDEL', KEYS[11], index .. ':' .. name)
    end
    local is_reduce = reduce_server and index == total_items
    local event = {'type', is_reduce and 'reduce.settled' or 'item.settled', 'job_id', job_id,
      'index', index, 'status', status}
    if degraded then
      event[#event + 1] = 'degraded'
      event[#event + 1] = '1'
    end
    if failure ~= '' then
      event[#event + 1] = 'failure'
      event[#event + 1] = failure
    end
    if is_reduce then
      redis.call('HSET', meta, 'reduce_status', status)
    elseif not log_mode then
      redis.call('HINCRBY', meta, status, 1)
      if degraded then
        redis.call('HINCRBY', meta, 'degraded', 1)
      end
      if failure ~= '' then
        redis.call('HINCRBY', KEYS[10], failure, 1)
      end
    end
    append(event)
    if not is_reduce then
      release_dependents(index)
    end
    committed = committed + 1
    landed[#landed + 1] = '1'
  end
end
if refused > 0 then
  redis.call('HINCRBY', meta, 'refused_commits', refused)
end
ready_chunks()

local finished = 0
local unsnapshotted = 0
local reduce_chunk = ''
if committed > 0 then
  if log_mode then
    unsnapshotted = redis.call('HINCRBY', meta, 'unsnapshotted', committed)
  else
    redis.call('HINCRBY', meta, 'version', 1)
  end
  local m = redis.call('HMGET', meta, 'total', 'state', 'cancel_requested')
  local total = tonumber(m[1]) or 0
  local all_settled = redis.call('HLEN', results) >= total
  local done = all_settled
  if reduce_server then
    done = redis.call('HEXISTS', results, m[1]) == 1
    if all_settled and not done and redis.call('HSETNX', meta, 'reduce_ready_at_ms', now_ms) == 1 then
      local id = job_id .. '-reduce'
      reduce_chunk = cjson.encode({job_id = job_id, server = reduce_server, items = {total}, id = id,
        urgent = true})
      redis.call('HSET', KEYS[12], id, reduce_chunk)
    end
  end
  if done and m[2] ~= 'finished' and m[2] ~= 'cancelled' then
    local final = m[3] and 'cancelled' or 'finished'
    redis.call('HSET', meta, 'state', final, 'finished_at_ms', now_ms)
    redis.call('SREM', KEYS[9], job_id)
    redis.call('DEL', KEYS[11])
    local fields = {'type', 'job.completed', 'job_id', job_id, 'state', final, 'total', m[1],
      'at_ms', now_ms}
    if not log_mode then
      local counts = redis.call('HMGET', meta, 'succeeded', 'failed', 'cancelled')
      for j, name in ipairs({'succeeded', 'failed', 'cancelled'}) do
        fields[#fields + 1] = name
        fields[#fields + 1] = counts[j] or '0'
      end
    else
      unsnapshotted = redis.call('HINCRBY', meta, 'unsnapshotted', 1)
    end
    append(fields)
    retire()
    finished = 1
  end
  redis.call('PUBLISH', notify, committed)
end
return {committed, refused, finished, table.concat(landed), unsnapshotted, reduce_chunk, ready}
