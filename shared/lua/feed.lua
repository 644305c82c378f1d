-- Drop the head of a job's chunk backlog, but only if it is still the chunk the caller just
-- enqueued: of two workers feeding the same head at once, both enqueue it (the duplicate is
-- harmless: its items are leased or settled), one pops it, and no chunk is ever lost.
-- KEYS: backlog   ARGV: expected_head
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  return 1
end
return 0
