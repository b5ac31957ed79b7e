-- gc_lookup.lua: remove a stale lookup, a locator naming a home (or one home from a run's set of homes), only if
-- nothing touched the key since gc_peek.lua read it and a grace period has passed since.
--
-- A save writes its lookups (SET locator, SADD run homes: both touch the key) and then, in another slot, its
-- script. The caller checked, after the grace period, that the home holds nothing the lookup points to; so a save
-- whose lookup write this script cannot see (one older than the peek, or inside the peek's second: idle time is
-- kept in whole seconds) would have had to stall for most of the grace period between its two writes.
--
-- KEYS[1] the key   ARGV[1] 'locator' | 'runflows'   ARGV[2] the home   ARGV[3] the peek's server time (ms)
-- ARGV[4] grace period (ms)
--
-- Reply: 1 removed | 0 kept (touched since the peek, or no longer names the home) | -1 too early | -2 no idle time

local idle = redis.pcall('OBJECT', 'IDLETIME', KEYS[1])  -- first: the reads below touch the key
if type(idle) == 'table' and idle.err then
  return -2
end
if not idle then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local peek_ms = tonumber(ARGV[3])
if now_ms < peek_ms + tonumber(ARGV[4]) then
  return -1
end
-- the whole second the key was last touched in, at the latest: after the peek's second (+1 for the LRU clock's lag)
if math.floor(now_ms / 1000) - idle > math.floor(peek_ms / 1000) + 1 then
  return 0
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] == 'locator' then
  if kind == 'string' and redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
elseif kind == 'set' then
  return redis.call('SREM', KEYS[1], ARGV[2])
end
return 0
