-- settle.lua: a worker found nothing to claim in a flow: look at it again when its next run falls due, or forget
-- it when it has none; only if no write announced new work for the flow since the worker read its version
-- (a save that takes a lease, a pause with a timer, a hand-back, an answer), else it stays due.
--
-- KEYS[1] P:wake:{<n>}   KEYS[2] P:wake:{<n>}:v
-- ARGV[1] flow   ARGV[2] the version the worker read ('' = none)   ARGV[3] when to look again (ms), '' = forget it
--
-- Reply: 1 settled | 0 new work came meanwhile

if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
end
return 1
