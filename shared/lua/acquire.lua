-- Take up to N slots of a server's cluster-wide semaphore.
-- Holders are members of a sorted set scored by expiry: a dead worker's slots come back when
-- their expiry passes (live holders renew them every heartbeat).
-- KEYS: slots
-- ARGV: limit, now_ms, expiry_ms, token...
-- Returns how many of the given tokens now hold a slot (the first ones, in order).
local slots = KEYS[1]
local limit, now_ms, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
local free = limit - redis.call('ZCARD', slots)
local granted = 0
for i = 4, #ARGV do
  if granted >= free then
    break
  end
  redis.call('ZADD', slots, expiry, ARGV[i])
  granted = granted + 1
end
return granted
