-- A write to one of a job's keys from outside its lifecycle scripts (a heartbeat, a feed, the
-- sweep): done only while the job exists, and a key it creates after the job ended expires with
-- the job. So a worker or reaper still busy with a job that expired or was deleted brings back
-- no part of it.
-- KEYS: meta, target   ARGV: command (HSET | HINCRBY | RPUSH), its arguments after the key
-- Returns 1 when written, 0 when the job is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call(ARGV[1], KEYS[2], unpack(ARGV, 2))
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
