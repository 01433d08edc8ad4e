-- Record a job's final result in its batch, atomically with the batch's counts (progress is one HMGET however
-- large the batch), its per-worker done counts and its latest failures (what `itsd status --watch` reads).
-- KEYS: batch, results, statuses, by_worker, failures
-- ARGV: job id, status, result JSON, first ("1": keep an existing result), expiry seconds, worker, failures kept
if ARGV[4] == '1' and redis.call('hexists', KEYS[3], ARGV[1]) == 1 then return 0 end
local old = redis.call('hget', KEYS[3], ARGV[1])
if old then redis.call('hincrby', KEYS[1], 'n_' .. old, -1) end
redis.call('hincrby', KEYS[1], 'n_' .. ARGV[2], 1)
redis.call('hset', KEYS[3], ARGV[1], ARGV[2])
redis.call('hset', KEYS[2], ARGV[1], ARGV[3])
if ARGV[2] == 'done' and old ~= 'done' then redis.call('hincrby', KEYS[4], ARGV[6], 1) end
if ARGV[2] == 'failed' then
  redis.call('lpush', KEYS[5], ARGV[3])
  redis.call('ltrim', KEYS[5], 0, ARGV[7] - 1)
end
for i = 1, 5 do redis.call('expire', KEYS[i], ARGV[5]) end
return 1
