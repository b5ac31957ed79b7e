-- renew.lua: extend a lease, only for the holder whose token is still current and whose lease has not run out.
--
-- KEYS[1] the run's lease hash   KEYS[2] the flow's lease index (zset)
-- ARGV[1] owner   ARGV[2] token   ARGV[3] ttl (ms)   ARGV[4] the run's key
--
-- Reply: {'OK', expiry_ms} | {'FENCED', owner, token} (taken over) | {'EXPIRED'} (still ours, but it ran out:
--        a worker may claim it at any moment, so the holder must stop) | {'VANISHED'} (the lease hash is gone:
--        Redis restarted empty, was flushed, or the key was evicted or deleted) | {'WRONGTYPE', key}

-- Both keys are checked: an error reply would fail the heartbeat's whole pipeline of renewals, not only this one.
local expected = {'hash', 'zset'}
for i = 1, 2 do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= expected[i] and kind ~= 'none' then
    return {'WRONGTYPE', KEYS[i]}
  end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'token', 'exp')
if not l[2] then
  return {'VANISHED'}
end
if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] then
  return {'FENCED', l[1] or '', l[2] or '0'}
end
if (tonumber(l[3]) or 0) <= now_ms then
  return {'EXPIRED'}
end
local exp = string.format('%.0f', now_ms + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'exp', exp)
redis.call('ZADD', KEYS[2], exp, ARGV[4])
return {'OK', exp}
