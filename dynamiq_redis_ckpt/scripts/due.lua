-- due.lua: the runs of one flow that a worker may claim now, and when its next one falls due. Read only.
--
-- KEYS[1] P:flow:{F}:leases   zset: run -> when claimable (lease expiry, or the end of a retry back-off; ms)
-- KEYS[2] P:flow:{F}:due      zset: run -> when a paused run is due (timer, or when a person answered; ms)
-- ARGV[1] how many runs of each kind at most
--
-- Reply: {next, {orphaned runs}, {due runs}}, where next is the earliest score in either index, claimable or not
--        ('' when both are empty: the flow has nothing left for workers) | {'WRONGTYPE', key}

for i = 1, 2 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= 'zset' then return {'WRONGTYPE', KEYS[i]} end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local n = tonumber(ARGV[1])
local found, next_ms = {}, nil
for i = 1, 2 do
  found[i] = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now_ms, 'LIMIT', 0, n)
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (next_ms == nil or tonumber(first[2]) < next_ms) then
    next_ms = tonumber(first[2])
  end
end
return {next_ms and string.format('%.0f', next_ms) or '', found[1], found[2]}
