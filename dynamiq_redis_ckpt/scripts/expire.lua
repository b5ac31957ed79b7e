-- expire.lua: PEXPIRE only in the direction asked, as PEXPIRE's NX/GT/LT options do on Redis 7; a script because
-- Redis 6.2 has PEXPIRE without options (its "wrong number of arguments" failed every save with a ttl there).
--
-- KEYS[1] the key (a run-flows set or a locator)
-- ARGV[1] ttl in ms
-- ARGV[2] 'longer': a key without expiry takes the ttl, one expiring sooner is lengthened (PEXPIRE NX, then GT)
--         'shorter': a key without expiry or expiring later is shortened to the ttl (PEXPIRE LT)
--
-- Reply: 1 the expiry was set | 0 it was not (no such key, or the key already expires as asked)

local left = redis.call('PTTL', KEYS[1])
if left == -2 then
  return 0
end
local ttl = tonumber(ARGV[1])
if left ~= -1 and ((ARGV[2] == 'longer' and left >= ttl) or (ARGV[2] ~= 'longer' and left <= ttl)) then
  return 0
end
return redis.call('PEXPIRE', KEYS[1], ttl)
