-- Delete a job now: every key of it (UNLINK: a million-item hash is freed off the main thread),
-- its idempotency key (meta 'idempotency_key'), its leases and its entries in the global sets.
-- The job's events in the global stream are the caller's (a script cannot search a stream by
-- field).
-- KEYS: meta, running, jobs, active, backlogged, expiring, leases, then every key of the job
-- ARGV: job_id
-- Returns 1 when the job existed, else 0 (the global entries are dropped either way).
local meta, running, leases, job_id = KEYS[1], KEYS[2], KEYS[7], ARGV[1]
local existed = redis.call('EXISTS', meta)
local idempotency_key = redis.call('HGET', meta, 'idempotency_key')
if idempotency_key and redis.call('GET', idempotency_key) == job_id then
  redis.call('DEL', idempotency_key)
end
for _, index in ipairs(redis.call('HKEYS', running)) do
  redis.call('ZREM', leases, job_id .. ':' .. index)
end
redis.call('ZREM', KEYS[3], job_id)
redis.call('SREM', KEYS[4], job_id)
redis.call('SREM', KEYS[5], job_id)
redis.call('ZREM', KEYS[6], job_id)
for k = 8, #KEYS do
  redis.call('UNLINK', KEYS[k])
end
return existed
