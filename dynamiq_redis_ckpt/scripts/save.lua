-- save.lua: write one checkpoint with its indexes and content packs, atomically, in one hash slot.
--
-- KEYS[1]  checkpoint hash              KEYS[6]  new parent's hash (KEYS[1] when there is no parent)
-- KEYS[2]  flow index (zset)            KEYS[7]  old status index  (what the caller believes is stored)
-- KEYS[3]  new status index             KEYS[8]  old run_id index
-- KEYS[4]  new run_id index             KEYS[9]  old wf_run_id index
-- KEYS[5]  new wf_run_id index          KEYS[10] old parent's hash
-- KEYS[11] the run's lease hash      KEYS[12] the flow's lease index (zset)   KEYS[13] the flow's due timers (zset)
-- KEYS[14 .. 13+ARGV[20]]  packs the new version names (the new pack first when ARGV[19] ~= '')
-- KEYS[14+ARGV[20] .. 13+ARGV[20]+ARGV[31]]  packs the old version names
-- KEYS[14+ARGV[20]+ARGV[31] .. ]  further keys it may touch, declared by the caller: the bases down the chains of
--          those packs and of the new pack's base, the packs a held parent names (and their chains), and the lease
--          of a run this save supersedes. The script touches no other key: it answers UNDECLARED first (_packs.lua).
-- A pack is a string: its reference count as 8 ASCII digits, then its blob (a hash would cost twice the memory).
-- A checkpoint names the newest packs of its chains; the bases they hold are counted by them (see _packs.lua).
--
-- ARGV[1] must_exist '1'|'0'          ARGV[2] ttl in ms, '0' = keep forever
-- ARGV[3] '1' if the caller believes the checkpoint is stored; ARGV[4..8] the stored st, run, wf, par, pk it expects
-- ARGV[9] checkpoint id   ARGV[10] flow id   ARGV[11] status   ARGV[12] run_id   ARGV[13] wf_run_id ('' = none)
-- ARGV[14] parent id ('' = none)   ARGV[15] created_at (µs, the index score)   ARGV[16] root document's address
-- ARGV[17] the base the new pack holds ('' = none)   ARGV[18] format version   ARGV[19] new pack blob ('' = none)
-- ARGV[20] count of packs named
-- ARGV[21] pack ids, comma separated (same order as the keys)   ARGV[22] raw size   ARGV[23] stored size
-- ARGV[24] lease mode: '' (a plain save: the lease is left alone), 'take' (a running flow acquires it, or takes it
--          over bumping the token), 'held' (compare-and-set), 'resume' (re-take a lease this writer handed back on a
--          pause, only if its token is still the current one)
-- ARGV[25] lease owner   ARGV[26] the writer's fencing token   ARGV[27] lease ttl (ms)   ARGV[28] the run's key
-- ARGV[29] resume_at (ms since epoch, '' = none): when a paused run is due (its timer's index; its retention)
-- ARGV[30] how many nodes the checkpoint has completed: progress resets the run's failed-recovery count
-- ARGV[31] how many packs the old version names (keys after the new version's packs)
--
-- Reply: {'OK', server_time_us, token}
--      | {'NOTFOUND'}                                   must_exist and the checkpoint is absent
--      | {'RETRY', present, st, run, wf, par, pk}       the stored version is not the one the caller expected
--      | {'MISSING', pack_id}                           a named pack or the new one's base is gone; resend
--      | {'UNDECLARED', {pack, base, ...}, {key, ...}}  a key it may touch was not declared (the links it learned
--                                                       on the way, the keys to add); nothing was written
--      | {'WRONGTYPE', key}                             a key holds another type; nothing was written
--      | {'FENCED', owner, token}                       'held' and the lease is no longer the writer's
--      | {'VANISHED'}                                   'held' or 'resume' and the lease hash is gone (Redis
--                                                       restarted empty, flushed, or the key evicted or deleted)

-- A script is not rolled back when a command fails, so every key's type is checked before the first write
-- (TYPE is the costliest call here: each distinct key is asked once; the packs are asked below, where their
-- existence is checked too).
local P = 13
local expected_type = {'hash', 'zset', 'zset', 'zset', 'zset', 'hash', 'zset', 'zset', 'zset', 'hash', 'hash', 'zset',
  'zset'}
local type_of = {}
local function check(key, expected)
  if type_of[key] == nil then
    type_of[key] = redis.call('TYPE', key)['ok']
  end
  local t = type_of[key]
  return t == 'none' or t == expected
end
for i = 1, P do
  if not check(KEYS[i], expected_type[i]) then
    return {'WRONGTYPE', KEYS[i]}
  end
end

local cp = KEYS[1]
local ttl = tonumber(ARGV[2])
local stored = redis.call('HMGET', cp, 'st', 'run', 'wf', 'par', 'pk', 'kids')
local present = stored[1] ~= false

if ARGV[1] == '1' and not present then
  return {'NOTFOUND'}
end
local expected_present = ARGV[3] == '1'
if present ~= expected_present or (present and (stored[1] ~= ARGV[4] or stored[2] ~= ARGV[5]
    or (stored[3] or '') ~= ARGV[6] or (stored[4] or '') ~= ARGV[7] or (stored[5] or '') ~= ARGV[8])) then
  if not present then
    return {'RETRY', '0', '', '', '', '', ''}
  end
  return {'RETRY', '1', stored[1], stored[2], stored[3] or '', stored[4] or '', stored[5] or ''}
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local server_us = string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2]))

-- Fencing: a 'held' write lands only while the lease is still the writer's and has not run out.
local lease_mode, lease = ARGV[24], KEYS[11]
if (lease_mode == 'held' or lease_mode == 'resume') and not redis.call('HGET', lease, 'token') then
  return {'VANISHED'}
end
if lease_mode == 'held' then
  local l = redis.call('HMGET', lease, 'owner', 'token', 'exp')
  if l[1] ~= ARGV[25] or l[2] ~= ARGV[26] or (tonumber(l[3]) or 0) <= now_ms then
    return {'FENCED', l[1] or '', l[2] or '0'}
  end
elseif lease_mode == 'resume' then
  local l = redis.call('HMGET', lease, 'owner', 'token', 'exp')
  local someone_else = l[1] ~= '' and l[1] ~= ARGV[25] and (tonumber(l[3]) or 0) > now_ms
  if l[2] ~= ARGV[26] or someone_else then
    return {'FENCED', l[1] or '', l[2] or '0'}
  end
end

local npacks = tonumber(ARGV[20])
local first_old = P + 1 + npacks
local last_old = first_old + tonumber(ARGV[31]) - 1
local has_new_pack = ARGV[19] ~= ''
for i = P + 1, last_old do
  if not check(KEYS[i], 'string') then
    return {'WRONGTYPE', KEYS[i]}
  end
end
for i = (has_new_pack and P + 2 or P + 1), P + npacks do
  if type_of[KEYS[i]] == 'none' then
    local ids = {}
    for id in string.gmatch(ARGV[21], '[^,]+') do ids[#ids + 1] = id end
    return {'MISSING', ids[i - P]}
  end
end
local new_base = ARGV[17] ~= '' and has_new_pack and type_of[KEYS[P + 1]] == 'none' and base_key(KEYS[P + 1], ARGV[17])
if new_base and not declared[new_base] then
  need(new_base, id_of(KEYS[P + 1]), ARGV[17])
  return undeclared()
end
if new_base and not check(new_base, 'string') then
  return {'WRONGTYPE', new_base}
elseif new_base and type_of[new_base] == 'none' then
  return {'MISSING', ARGV[17]}
end

-- A paused run's newest checkpoint must outlive its wait, whatever the ttl: with a timer, until a day after it is
-- due; waiting for a person, for as long as it waits (no expiry). Its packs, indexes and lease follow it. Once the
-- run goes on, its next save gives the paused checkpoint and its packs the ttl again (below).
local st = ARGV[11]
local paused = st == 'pending_input' or st == 'paused'
local due = tonumber(ARGV[29])
local hold = ttl
if paused and ttl > 0 then
  hold = due and math.max(ttl, due - now_ms + 86400000) or 0
end
local function held_past_ttl(key)  -- no expiry, or one later than the ttl: what a pause's hold gave it
  local left = redis.call('PTTL', key)
  return left == -1 or left > ttl
end
local parent_held, parent_packs = false, nil
if ttl > 0 and not paused and ARGV[14] ~= '' and ARGV[14] ~= ARGV[9] and type_of[KEYS[6]] == 'hash'
    and held_past_ttl(KEYS[6]) then
  local f = redis.call('HMGET', KEYS[6], 'st', 'pk')
  parent_held, parent_packs = f[1] == 'pending_input' or f[1] == 'paused', f[2]
end

-- Every key the writes below will reach is declared, or nothing is written: a dry run of them first, reading declared
-- keys only and in the writes' order (_packs.lua): a held parent's packs handed back to the ttl, the references taken
-- (the new pack's base), the TTL walks down the named packs' chains, the references dropped (which may cascade down
-- chains), and below, a superseded run's lease.
local creates_pack = has_new_pack and type_of[KEYS[P + 1]] == 'none'
local released = {}
if ttl > 0 and not paused and parent_held then
  local pack_prefix = string.match(KEYS[P + 1], '^(.*:)')  -- every save names a pack: a key of the flow's packs
  for pk in string.gmatch(parent_packs or '', '[^,]+') do
    local key = pack_prefix .. pk
    if not declared[key] then
      need(key)
    end
    while key and declared[key] and not released[key] and held_past_ttl(key) do
      released[key] = true
      key = plan_base(key)
    end
  end
end
if creates_pack then
  planned_count[KEYS[P + 1]] = 1
  planned_base[KEYS[P + 1]] = new_base or false
  if new_base then
    plan_refs(new_base, 1)
  end
end
for i = P + 1, P + npacks do
  if not (i == P + 1 and creates_pack) then
    plan_refs(KEYS[i], 1)
  end
end
for i = P + 1, P + npacks do  -- extend_chain's walk (a base handed back above has the ttl now: the walk goes on)
  local base = plan_base(KEYS[i])
  while base do
    if not released[base] then
      local left = redis.call('PTTL', base)
      if left == -2 or left == -1 or (hold > 0 and left >= hold) then
        break
      end
    end
    base = plan_base(base)
  end
end
if present then
  for i = first_old, last_old do
    plan_refs(KEYS[i], -1)
  end
end
local function superseded_lease(lease, run_key)  -- the lease supersede() below takes over, or nil
  if ARGV[24] ~= 'take' or ARGV[14] == '' or ARGV[14] == ARGV[9] or type_of[KEYS[6]] ~= 'hash' then
    return nil
  end
  local p = redis.call('HMGET', KEYS[6], 'run', 'wf')
  local old_run = (p[2] and p[2] ~= '') and p[2] or p[1]
  if not old_run or old_run == '' or old_run == run_key then
    return nil
  end
  return string.sub(lease, 1, #lease - #run_key) .. old_run
end
local old_lease = superseded_lease(KEYS[11], ARGV[28])
if old_lease and not declared[old_lease] then
  need(old_lease)
end
local missing = undeclared()
if missing then
  return missing
end

-- Shared keys (packs, indexes) must outlive every checkpoint that uses them: a key this save creates takes the
-- hold, an existing one is only ever lengthened, and a save without one makes it permanent.
local function extend(key, created)
  if hold > 0 then
    local left = redis.call('PTTL', key)
    if created or (left >= 0 and left < hold) then
      redis.call('PEXPIRE', key, hold)
    end
  else
    redis.call('PERSIST', key)
  end
end
-- A base outlives the packs holding it, so the walk down a chain stops at the first base already long-lived enough.
local function extend_chain(key, created)
  extend(key, created)
  local base = base_of(key)
  while base do
    local left = redis.call('PTTL', base)
    if left == -2 or left == -1 or (hold > 0 and left >= hold) then
      break
    end
    extend(base, false)
    base = base_of(base)
  end
end

-- A run going on from a checkpoint that was held for its pause hands it (and the packs it names, down their chains)
-- back to the ttl: only what was held past the ttl is touched.
local function release_hold(key)
  while key and held_past_ttl(key) do
    redis.call('PEXPIRE', key, ttl)
    key = base_of(key)
  end
end
if ttl > 0 and not paused and parent_held then
  redis.call('PEXPIRE', KEYS[6], ttl)
  local pack_prefix = string.match(KEYS[P + 1], '^(.*:)')  -- every save names a pack: a key of the flow's packs
  for id in string.gmatch(parent_packs or '', '[^,]+') do
    if declared[pack_prefix .. id] then  -- checked above: all are
      release_hold(pack_prefix .. id)
    end
  end
end

-- References are taken before old ones are dropped, so a pack both versions use never reaches zero.
local pack_created = false
if has_new_pack and type_of[KEYS[P + 1]] == 'none' then
  redis.call('SET', KEYS[P + 1], '00000001' .. ARGV[19])  -- born with this save's reference
  pack_created = true
  if new_base then
    add_refs(new_base, 1)
  end
end
for i = P + 1, P + npacks do
  local created = i == P + 1 and pack_created
  if not created then
    add_refs(KEYS[i], 1)
  end
  extend_chain(KEYS[i], created)
end
if present then
  for i = first_old, last_old do
    add_refs(KEYS[i], -1)
  end
  for i = 7, 9 do
    redis.call('ZREM', KEYS[i], ARGV[9])
    type_of[KEYS[i]] = nil  -- a zset that lost its last member is gone: the ZADD below creates it again
  end
end

local id = ARGV[9]
local parent = ARGV[14]
local old_parent = present and (stored[4] or '') or ''
if old_parent ~= parent then
  if old_parent ~= '' and type_of[KEYS[10]] ~= 'none' then
    redis.call('HINCRBY', KEYS[10], 'kids', -1)
  end
  if parent ~= '' and parent ~= id and type_of[KEYS[6]] ~= 'none' then
    redis.call('HINCRBY', KEYS[6], 'kids', 1)
  end
end

local score = ARGV[15]
for i = 2, 5 do
  if type_of[KEYS[i]] == nil then
    type_of[KEYS[i]] = redis.call('TYPE', KEYS[i])['ok']
  end
  local created = type_of[KEYS[i]] == 'none'  -- a new key takes the ttl (an existing one is only lengthened)
  redis.call('ZADD', KEYS[i], score, id)
  type_of[KEYS[i]] = 'zset'
  extend(KEYS[i], created)
end

-- Fields stay short (a checkpoint mostly names one pack; long user ids aside), so Redis keeps the hash as a compact
-- listpack. An overwrite writes it anew: deleting fields would not turn a hashtable (format 3's) back into a listpack.
local kids = stored[6]  -- read above; only a parent's count changed since, and a checkpoint is not its own parent
if present then
  redis.call('DEL', cp)
end
redis.call('HSET', cp, 'st', ARGV[11], 'run', ARGV[12], 'wf', ARGV[13], 'par', parent, 'ts', score, 'sv', server_us,
  'root', ARGV[16], 'fmt', ARGV[18], 'pk', ARGV[21], 'raw', ARGV[22], 'size', ARGV[23])
if kids then
  redis.call('HSET', cp, 'kids', kids)
end
if hold > 0 then
  redis.call('PEXPIRE', cp, hold)
else
  redis.call('PERSIST', cp)
end

-- An explicit resume from another run's newest checkpoint (resume_from without that run's id, so Dynamiq drew a
-- new wf_run_id) takes that run over as well: its lease is fenced (token bumped) and leaves the workers' indexes,
-- so neither a zombie of it nor a worker runs it a second time. A resume from an older checkpoint is a fork and
-- leaves the run alone. Its lease key is this run's with the run key swapped (same flow tag, same slot).
local function supersede(lease, run_key)
  if not old_lease then  -- found before the first write (above), and declared
    return
  end
  local old_run = string.sub(old_lease, #lease - #run_key + 1)
  if redis.call('TYPE', old_lease)['ok'] == 'hash' and redis.call('HGET', old_lease, 'head') == parent then
    redis.call('HINCRBY', old_lease, 'token', 1)
    redis.call('HSET', old_lease, 'owner', '', 'exp', 0, 'superseded_by', run_key)
    redis.call('ZREM', KEYS[12], old_run)
    redis.call('ZREM', KEYS[13], old_run)
  end
end

-- The lease: held while the run is active, handed back (token kept) when it ends or pauses. Its 'head' is the
-- run's newest checkpoint in the order this server applied the saves, whatever the writers' clocks say.
local token = ARGV[26]
if lease_mode ~= '' then
  local run_key = ARGV[28]
  if lease_mode == 'take' then
    token = tostring(redis.call('HINCRBY', lease, 'token', 1))
    supersede(lease, run_key)
  end
  local done = tonumber(ARGV[30]) or 0
  if done > (tonumber(redis.call('HGET', lease, 'done') or '0') or 0) then
    -- A recovery that completed a node made progress: only attempts that get nowhere lead to dead letters.
    redis.call('HSET', lease, 'done', done, 'attempts', 0)
  end
  if st == 'active' then
    local exp = string.format('%.0f', now_ms + tonumber(ARGV[27]))
    redis.call('HSET', lease, 'owner', ARGV[25], 'exp', exp, 'head', id, 'flow', ARGV[10])
    redis.call('ZADD', KEYS[12], exp, run_key)
    redis.call('ZREM', KEYS[13], run_key)
    redis.call('PERSIST', lease)
  else
    redis.call('HSET', lease, 'owner', '', 'exp', 0, 'head', id, 'flow', ARGV[10], 'attempts', 0, 'done', done)
    redis.call('ZREM', KEYS[12], run_key)
    if paused and ARGV[29] ~= '' then
      redis.call('ZADD', KEYS[13], ARGV[29], run_key)
    else
      redis.call('ZREM', KEYS[13], run_key)
    end
    -- An ended run's token only has to outlive any holder that could still write (a week is far longer than
    -- any lease). A paused run's lease (its head) lives as long as its held checkpoint.
    if paused and hold == 0 then
      redis.call('PERSIST', lease)
    else
      redis.call('PEXPIRE', lease, math.max(paused and hold or ttl, 7 * 86400000))
    end
  end
end
return {'OK', server_us, token}
