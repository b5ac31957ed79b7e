-- gc_peek.lua: read a lookup key (a locator or a run's homes) for gc, with how long it had been left untouched
-- before this read (which touches it). OBJECT IDLETIME does not touch a key; GET and SMEMBERS do, so the idle time is
-- read first. gc_lookup.lua later removes the key only if nothing touched it after this read.
--
-- KEYS[1] the key   ARGV[1] 'locator' (a string) | 'runflows' (a set)
--
-- Reply: {idle seconds, server time ms, value | {member, ...}} | {'NOIDLE'} when the server does not track idle
--        time (an LFU maxmemory policy) | {'NONE'} when the key is absent or of another type

local idle = redis.pcall('OBJECT', 'IDLETIME', KEYS[1])
if type(idle) == 'table' and idle.err then
  return {'NOIDLE'}
end
if not idle then
  return {'NONE'}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local kind = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] == 'locator' and kind == 'string' then
  return {idle, now_ms, redis.call('GET', KEYS[1])}
elseif ARGV[1] == 'runflows' and kind == 'set' then
  return {idle, now_ms, redis.call('SMEMBERS', KEYS[1])}
end
return {'NONE'}
