-- release.lua: the holder hands its lease back, so another worker continues at once (no waiting for expiry).
-- A graceful hand-back is not a failed attempt; a failed one makes the run claimable again after a backoff.
--
-- KEYS[1] the run's lease hash   KEYS[2] the flow's lease index (zset)
-- ARGV[1] owner   ARGV[2] token   ARGV[3] the run's key   ARGV[4] 'handback' | 'failed'   ARGV[5] backoff (ms)
--
-- Reply: {'OK'} | {'FENCED', owner, token}

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'token')
if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] then
  return {'FENCED', l[1] or '', l[2] or '0'}
end
redis.call('HSET', KEYS[1], 'owner', '', 'exp', 0)
if ARGV[4] == 'handback' then
  if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then
    redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  end
  redis.call('ZADD', KEYS[2], now_ms, ARGV[3])
else
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[5]), ARGV[3])
end
return {'OK'}
