-- Pin a batch to the identity of the model that runs its jobs: the first worker to ask sets it, every later one
-- reads it, in one step (two workers starting on an unpinned batch at once see the same pin).
-- KEYS: batch; ARGV: the record's pin field, the identity of the model the asking worker serves. Returns the
-- batch's pin; a batch whose record is gone (expired) is not recreated for it.
if redis.call('exists', KEYS[1]) == 0 then return ARGV[2] end
redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2])
return redis.call('hget', KEYS[1], ARGV[1])
