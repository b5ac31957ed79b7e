-- delete.lua: delete checkpoints of one flow with their index entries and pack references, atomically.
-- Each candidate is deleted only if it is still stored exactly as the caller saw it, so a concurrent save
-- (REPLACE re-labelling, a new child) is never undone. With protect = '1' the head of a chain (no stored
-- checkpoint names it as parent) whose status is active, paused or pending_input is kept: a run in flight or
-- waiting for a person. Heads are judged before anything is deleted, so deleting a child in this same call
-- does not turn its parent into a protected head.
--
-- KEYS[1]  flow index (zset)
-- then per candidate, in order: checkpoint hash, status index, run_id index, wf_run_id index, parent hash,
--                               and the packs it names (a pack let go of lets go of its base: _packs.lua)
-- then the keys of the bases down those packs' chains (the caller declares every chain key it knows of)
-- ARGV[1]  protect '1'|'0'
-- then per candidate, 8 values: id, st, run, wf, par, pk, ts (as read), number of packs
--
-- Reply: {'OK', ids deleted...}, or {'WRONGTYPE', key} (nothing deleted) when a key holds another type, or
-- {'UNDECLARED', links, keys} (nothing deleted) when a chain it may let go of reaches a key not declared.

-- A script is not rolled back when a command fails, so this first pass (which only reads) checks every key's
-- type and judges every candidate before the first write.
local function wrong(key, want)
  local t = redis.call('TYPE', key)['ok']
  return t ~= 'none' and t ~= want
end
if wrong(KEYS[1], 'zset') then return {'WRONGTYPE', KEYS[1]} end

local protect = ARGV[1] == '1'
local live = {active = true, paused = true, pending_input = true}
local doomed = {}
local k, a = 2, 2
while a <= #ARGV do
  local npacks = tonumber(ARGV[a + 7])
  for i = k, k + 4 + npacks do
    local want = (i == k + 1 or i == k + 2 or i == k + 3) and 'zset' or (i > k + 4 and 'string' or 'hash')
    if wrong(KEYS[i], want) then return {'WRONGTYPE', KEYS[i]} end
  end
  local cur = redis.call('HMGET', KEYS[k], 'st', 'run', 'wf', 'par', 'pk', 'ts', 'kids')
  -- A field missing from a damaged hash reads as '' on both sides, so a damaged record can still be deleted.
  local exists = redis.call('EXISTS', KEYS[k]) == 1
  local same = exists
  for i = 1, 6 do
    same = same and (cur[i] or '') == ARGV[a + i]
  end
  local head_in_flight = live[ARGV[a + 1]] and (tonumber(cur[7]) or 0) <= 0
  if same and not (protect and head_in_flight) then
    doomed[#doomed + 1] = {k, a, npacks}
  end
  k = k + 5 + npacks
  a = a + 8
end

-- Letting go of a pack may delete it and its bases down the chain: every key that reaches must be declared.
for _, c in ipairs(doomed) do
  local k, npacks = c[1], c[3]
  for i = k + 5, k + 4 + npacks do
    plan_refs(KEYS[i], -1)
  end
end
local missing = undeclared()
if missing then
  return missing
end

local deleted = {'OK'}
for _, c in ipairs(doomed) do
  local k, a, npacks = c[1], c[2], c[3]
  local id, par = ARGV[a], ARGV[a + 4]
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[k + 1], id)
  redis.call('ZREM', KEYS[k + 2], id)
  redis.call('ZREM', KEYS[k + 3], id)
  if par ~= '' and redis.call('EXISTS', KEYS[k + 4]) == 1 then
    redis.call('HINCRBY', KEYS[k + 4], 'kids', -1)
  end
  for i = k + 5, k + 4 + npacks do
    add_refs(KEYS[i], -1)
  end
  redis.call('DEL', KEYS[k])
  deleted[#deleted + 1] = id
end
return deleted
