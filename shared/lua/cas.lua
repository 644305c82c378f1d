-- Compare-and-swap a versioned record: write only if its version is still the one read.
-- The record is a hash {version, data}; a missing record has version 0.
-- KEYS: record
-- ARGV: expected_version, new_data
-- Returns {1, new_version} on success, {0, current_version} on conflict.
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
redis.call('HSET', KEYS[1], 'version', current + 1, 'data', ARGV[2])
return {1, current + 1}
