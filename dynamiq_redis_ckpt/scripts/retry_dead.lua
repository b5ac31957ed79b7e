-- retry_dead.lua: put a dead-lettered run back, claimable at once with a fresh attempt count, atomically (a crash
-- can never leave it in neither index).
--
-- KEYS[1] P:flow:{F}:dead   KEYS[2] P:lease:{F}:<run>   KEYS[3] P:flow:{F}:leases
-- ARGV[1] the run's key
--
-- Reply: 1 put back | 0 not a dead letter

if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], 'attempts', 0)
redis.call('ZADD', KEYS[3], 0, ARGV[1])
return 1
