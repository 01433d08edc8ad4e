-- Drop results so their jobs run again, keeping the batch's counts in step.
-- KEYS: batch, results, statuses, outputs; ARGV: the job ids
for _, id in ipairs(ARGV) do
  local old = redis.call('hget', KEYS[3], id)
  if old then redis.call('hincrby', KEYS[1], 'n_' .. old, -1) end
  redis.call('hdel', KEYS[3], id)
  redis.call('hdel', KEYS[2], id)
  redis.call('hdel', KEYS[4], id)
end
return #ARGV
