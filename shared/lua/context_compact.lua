-- Apply a compaction of a session's window (shared/context.py, RedisContextStore): the compactor
-- read the window's head, summarized it outside Redis (maybe an MCP call), and now drops those
-- records and sets the combined summary, only if nothing moved the head meanwhile. With a count
-- of 0 (nothing was left to summarize) it only releases the lock, if the window fits.
--
-- Appends only push at the tail; only a compaction (which bumps the generation) or a new
-- context (a new incarnation, after clear or expiry) changes the head. So an unchanged
-- incarnation and generation mean the head still holds exactly the records summarized.
-- The lock is released only here, in the step that finds the window fits: an append that
-- overflowed it while the lock was held (and so did not compact) is always seen by the holder.
--
-- KEYS: meta, window, compacting
-- ARGV: incarnation, generation, count (records summarized, from the head), summary, lock_token,
--       max_window, lock_ms
-- Returns: 'done'  (the window fits; the lock is released)
--          'again' (the window still overflows; the lock is kept: compact again)
--          'retry' (another compactor moved the head first; the lock is ours: read again)
--          'stop'  (the context is gone or renewed, or another compactor holds the lock)
local meta, window, compacting = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HGET', meta, 'incarnation') ~= ARGV[1] then
  return 'stop'
end
local holder = redis.call('GET', compacting)
local holds = (not holder) or holder == ARGV[5]
if holds then
  redis.call('SET', compacting, ARGV[5], 'PX', ARGV[7])
end
local count = tonumber(ARGV[3])
if count > 0 then
  if redis.call('HGET', meta, 'generation') ~= ARGV[2] then
    if holds then return 'retry' end
    return 'stop'
  end
  redis.call('LTRIM', window, count, -1)
  redis.call('HSET', meta, 'summary', ARGV[4])
  redis.call('HINCRBY', meta, 'generation', 1)
end
if not holds then
  return 'stop'
end
if redis.call('LLEN', window) > tonumber(ARGV[6]) then
  return 'again'
end
redis.call('DEL', compacting)
return 'done'
