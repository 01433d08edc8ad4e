-- Delete a claim if this owner still holds it. KEYS: claim; ARGV: owner
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
