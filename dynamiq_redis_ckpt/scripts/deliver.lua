-- deliver.lua: store a person's answer for a node of a paused run, and make the run due now.
-- The answer stays until the resumed run has completed that node, so it survives the resuming pod crashing.
--
-- KEYS[1] the run's inbox (hash node_id -> answer JSON)   KEYS[2] the flow's due timers   KEYS[3] the run's lease
-- ARGV[1] the run's key   ARGV[2] node id   ARGV[3] answer JSON   ARGV[4] retention (ms, '0' = as long as kept)
--
-- Reply: {'OK'} | {'ANSWERED'} (the node has an answer already: the first one stands)
--      | {'RUNNING'} (the run holds a live lease: it is not waiting) | {'UNKNOWN'} (no such run)

local l = redis.call('HMGET', KEYS[3], 'owner', 'exp', 'head')
if not l[3] then return {'UNKNOWN'} end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if l[1] ~= '' and (tonumber(l[2]) or 0) > now_ms then return {'RUNNING'} end
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return {'ANSWERED'} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('ZADD', KEYS[2], now_ms, ARGV[1])  -- due now; the score says since when
return {'OK'}
