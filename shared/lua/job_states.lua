-- Count jobs of the jobs index by state, a slice at a time (so one call blocks Redis briefly).
-- A job's meta key is ARGV[1] .. job_id .. ARGV[2] (Keys.job(id).meta); the script reads those
-- keys without declaring them, which a single Redis allows and a cluster would not: a read-only
-- scan, like the reaper's, that a cluster layout would split per slot.
-- KEYS: jobs (sorted set)   ARGV: meta prefix, meta suffix, start, count
-- Returns {next start (0 at the end), state, count, state, count, ...}; a job whose meta is gone
-- (expired, deleted) is not counted.
local start, count = tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGE', KEYS[1], start, start + count - 1)
local counts, order = {}, {}
for _, job_id in ipairs(ids) do
  local state = redis.call('HGET', ARGV[1] .. job_id .. ARGV[2], 'state')
  if state then
    if not counts[state] then
      counts[state] = 0
      order[#order + 1] = state
    end
    counts[state] = counts[state] + 1
  end
end
local reply = {#ids == count and start + count or 0}
for _, state in ipairs(order) do
  reply[#reply + 1] = state
  reply[#reply + 1] = counts[state]
end
return reply
