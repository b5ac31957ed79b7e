-- delete.lua: delete checkpoints of one flow with their index entries and pack references, atomically.
-- Each candidate is deleted only if it is still stored exactly as the caller saw it, so a concurrent save
-- (REPLACE re-labelling, a new child) is never undone; with protect = '1' the head of a chain whose status
-- is active, paused or pending_input is kept (a run in flight or waiting for a person).
--
-- KEYS[1]  flow index (zset)
-- then per candidate, in order: checkpoint hash, status index, run_id index, wf_run_id index, parent hash,
--                               and its packs
-- ARGV[1]  protect '1'|'0'
-- then per candidate, 8 values: id, st, run, wf, par, pk, ts (as read), number of packs
--
-- Reply: the ids deleted.

local protect = ARGV[1] == '1'
local live = {active = true, paused = true, pending_input = true}
local deleted = {}
local k = 2
local a = 2
while a <= #ARGV do
  local id, st, run, wf, par, pk, ts = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5],
    ARGV[a + 6]
  local npacks = tonumber(ARGV[a + 7])
  local cp = KEYS[k]
  local cur = redis.call('HMGET', cp, 'st', 'run', 'wf', 'par', 'pk', 'ts', 'kids')
  local same = cur[1] == st and cur[2] == run and (cur[3] or '') == wf and (cur[4] or '') == par
    and (cur[5] or '') == pk and cur[6] == ts
  local head_in_flight = live[st] and (tonumber(cur[7]) or 0) <= 0
  if same and not (protect and head_in_flight) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[k + 1], id)
    redis.call('ZREM', KEYS[k + 2], id)
    redis.call('ZREM', KEYS[k + 3], id)
    if par ~= '' and redis.call('EXISTS', KEYS[k + 4]) == 1 then
      redis.call('HINCRBY', KEYS[k + 4], 'kids', -1)
    end
    for i = k + 5, k + 4 + npacks do
      if redis.call('HINCRBY', KEYS[i], 'n', -1) <= 0 then
        redis.call('DEL', KEYS[i])
      end
    end
    redis.call('DEL', cp)
    deleted[#deleted + 1] = id
  end
  k = k + 5 + npacks
  a = a + 8
end
return deleted
