-- Commit finished steps of pipeline items: a step's record lands only while the item is unsettled
-- and the epoch it was claimed under is still the newest, so a worker whose lease was taken over
-- cannot write one (and stops: its item has a new holder).
-- KEYS: epochs, results, steps
-- ARGV: per step: index, epoch, step name, step record (JSON)
-- Returns one char per step: '1' landed, '0' refused.
local epochs, results, steps = KEYS[1], KEYS[2], KEYS[3]
local landed = {}
for i = 1, #ARGV, 4 do
  local index, epoch = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', epochs, index) == epoch and redis.call('HEXISTS', results, index) == 0 then
    redis.call('HSET', steps, index .. ':' .. ARGV[i + 2], ARGV[i + 3])
    landed[#landed + 1] = '1'
  else
    landed[#landed + 1] = '0'
  end
end
return table.concat(landed)
