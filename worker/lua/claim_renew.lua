-- Extend a claim's TTL if this owner still holds it. KEYS: claim; ARGV: owner, ttl ms
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
