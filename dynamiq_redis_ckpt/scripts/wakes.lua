-- wakes.lua: the flows of one wake shard that a worker must look at now, with their versions. Read only.
-- A worker's idle poll costs one call per shard, however many flows ever ran: ended runs leave no entry behind.
--
-- KEYS[1] P:wake:{<n>}     zset: flow -> when a worker must look at it (server ms; 0 = now)
-- KEYS[2] P:wake:{<n>}:v   hash: flow -> version (a random token written with every announcement of new work)
-- ARGV[1] how many flows at most
--
-- Reply: {flow, version ('' when none), ...}

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {}
for _, flow in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))) do
  out[#out + 1] = flow
  out[#out + 1] = redis.call('HGET', KEYS[2], flow) or ''
end
return out
