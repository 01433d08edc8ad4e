-- Take over a claim from its dead owner, if that owner still holds it. KEYS: claim; ARGV: owner, ttl ms, dead owner
if redis.call('get', KEYS[1]) == ARGV[3] then return redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return false
