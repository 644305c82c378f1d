-- Hand pipeline items to another worker pool. For each item still unsettled whose sender's epoch
-- is still the newest: store its envelope beside its checkpoints and give its lease up at once, so
-- the receiving pool can claim it without waiting for an expiry. When any item was handed off,
-- record the continuation chunk as outstanding (the coverage sweep restores it if its message
-- never reaches the broker).
-- KEYS: epochs, results, steps, running, leases, chunks
-- ARGV: chunk id, chunk JSON, then per item: index, epoch, member ("job_id:index"), envelope JSON
-- Returns one char per item: '1' handed off, '0' refused (its lease was taken over, or it settled).
local epochs, results, steps, running, leases, chunks = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local landed = {}
local any = false
for i = 3, #ARGV, 4 do
  local index, epoch = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', epochs, index) == epoch and redis.call('HEXISTS', results, index) == 0 then
    redis.call('HSET', steps, index .. ':@handoff', ARGV[i + 3])
    redis.call('HDEL', running, index)
    redis.call('ZREM', leases, ARGV[i + 2])
    landed[#landed + 1] = '1'
    any = true
  else
    landed[#landed + 1] = '0'
  end
end
if any then
  redis.call('HSET', chunks, ARGV[1], ARGV[2])
end
return table.concat(landed)
