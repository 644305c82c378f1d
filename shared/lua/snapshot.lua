-- Move a log's snapshot forward and trim the stream below the previous snapshot (one snapshot
-- of history stays readable, so a finished job still shows its last events).
-- Only succeeds if the snapshot still covers exactly what the caller folded from
-- (a compare-and-swap on the last stream id), so snapshots never go backwards.
-- KEYS: snapshot (hash {state, last_id, count, at_ms}), stream, [counter hash: 'unsnapshotted' is
--       lowered by the events folded]
-- ARGV: expected_last_id ('' for none), new_state_json, new_last_id, folded_events, trim_minid, now_ms
-- With a counter hash (a job's meta), the log belongs to it: nothing is written once it is gone
-- (expired or deleted), and a snapshot written after the job ended expires with it.
-- Returns 1 when written, 0 when someone else moved the snapshot first (or the owner is gone).
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
local current = redis.call('HGET', KEYS[1], 'last_id') or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'last_id', ARGV[3], 'at_ms', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'count', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('XTRIM', KEYS[2], 'MINID', ARGV[5])
end
if KEYS[3] then
  if redis.call('HINCRBY', KEYS[3], 'unsnapshotted', -tonumber(ARGV[4])) < 0 then
    redis.call('HSET', KEYS[3], 'unsnapshotted', 0)
  end
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
return 1
