-- One access to a session's conversation context (shared/context.py, RedisContextStore).
-- Every access renews the session's expiry and its place in the LRU set, in the same step as
-- the op, so the idle TTL and the cap never disagree with what was read or written.
--
-- KEYS: sessions (zset id -> last access ms), meta (hash), window (list), compacting (lock)
--       (op count: sessions only)
-- ARGV: op (get | append | init | count), session_id, ttl_ms, max_sessions,
--       meta_head, meta_tail, window_head, window_tail, compacting_head, compacting_tail
--       (the key names of any session are head .. id .. tail: key layout stays in shared/keys.py)
--   append: ARGV[11..15] = record (JSON), incarnation (for a new context), max_window,
--           lock_token, lock_ms
--   init:   ARGV[11..12] = summary, incarnation
-- Returns: count: the number of live sessions
--          get, append, init: {0} when there is no context (get) or one already (init), else
--          {1, compact, summary or false, appended, updated_at_ms, record, ...}; compact = 1
--          when this append overflowed the window and took the compaction lock.
local op = ARGV[1]
local sessions = KEYS[1]
local ttl = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local idle_before = now - ttl

if op == 'count' then
  return redis.call('ZCOUNT', sessions, '(' .. idle_before, '+inf')
end

local function drop(id)
  redis.call('DEL', ARGV[5] .. id .. ARGV[6], ARGV[7] .. id .. ARGV[8], ARGV[9] .. id .. ARGV[10])
end

-- Sessions idle past the TTL: their keys have expired; forget them, a bounded batch per access.
local idle = redis.call('ZRANGEBYSCORE', sessions, '-inf', idle_before, 'LIMIT', 0, 100)
for _, id in ipairs(idle) do drop(id) end
if #idle > 0 then redis.call('ZREM', sessions, unpack(idle)) end

local session, meta, window, compacting = ARGV[2], KEYS[2], KEYS[3], KEYS[4]
local exists = redis.call('EXISTS', meta) == 1

if op == 'get' and not exists then
  redis.call('ZREM', sessions, session)
  return {0}
end
if op == 'init' and exists then
  return {0}
end

if not exists then
  -- A fresh context: a new incarnation, so a compactor that read the previous one cannot apply.
  redis.call('DEL', window, compacting)
  redis.call('HSET', meta, 'incarnation', ARGV[12], 'generation', 0, 'appended', 0, 'updated_at_ms', now)
  if op == 'init' then redis.call('HSET', meta, 'summary', ARGV[11]) end
end

local compact = 0
if op == 'append' then
  local length = redis.call('RPUSH', window, ARGV[11])
  redis.call('HINCRBY', meta, 'appended', 1)
  redis.call('HSET', meta, 'updated_at_ms', now)
  if length > tonumber(ARGV[13]) and redis.call('SET', compacting, ARGV[14], 'NX', 'PX', ARGV[15]) then
    compact = 1
  end
end

redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', window, ttl)
redis.call('ZADD', sessions, now, session)

if not exists then
  -- The cap: evict the least recently used sessions (never this one), a bounded batch.
  local over = math.min(redis.call('ZCARD', sessions) - tonumber(ARGV[4]), 1000)
  if over > 0 then
    local evicted = {}
    for _, id in ipairs(redis.call('ZRANGE', sessions, 0, over)) do
      if id ~= session and #evicted < over then
        drop(id)
        evicted[#evicted + 1] = id
      end
    end
    redis.call('ZREM', sessions, unpack(evicted))
  end
end

local fields = redis.call('HMGET', meta, 'summary', 'appended', 'updated_at_ms')
local reply = {1, compact, fields[1], tonumber(fields[2]), tonumber(fields[3])}
for _, record in ipairs(redis.call('LRANGE', window, 0, -1)) do
  reply[#reply + 1] = record
end
return reply
