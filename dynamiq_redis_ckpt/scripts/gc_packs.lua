-- gc_packs.lua: remove content packs of one home that no stored checkpoint needs, judged atomically at removal time.
--
-- A pack is needed when a checkpoint hash of the home names it (field 'pk'), or when it is the base of a needed pack
-- (a based pack was compressed against its base: any base, linked or format 3, counts). The script re-derives that
-- set from the hashes as they are now, so what the caller read earlier does not matter: a save or a delete that
-- landed since the caller looked is seen here. Reference counts are neither trusted nor changed (they may be leaked
-- high by hashes that expired or were deleted by hand; a kept pack's count stays high, which only delays its release
-- to a later gc). The caller declares every key the walk may touch; when one is missing the script writes nothing
-- and says what to add.
--
-- KEYS[1]   the home's flow index (zset): every checkpoint of the home is a member (save.lua adds it with the hash)
-- KEYS[2..] every checkpoint hash of the home and every pack key of the home the caller knows of (any order)
-- ARGV[1]   the home's pack key prefix ('P:pack:{F}:')   ARGV[2] the home's checkpoint key prefix ('P:cp:{F}:')
-- ARGV[3..] ids of the packs to remove if nothing needs them
--
-- Reply: {'OK', id, bytes, id, bytes, ...}     the packs removed and their sizes
--      | {'CHANGED', id, ...}                  checkpoints in the index whose hash keys were not declared
--      | {'UNDECLARED', key, ...}              packs the walk reached that were not declared
--      | {'WRONGTYPE', key}                    a key holds another type; nothing was removed

local pack_prefix, cp_prefix = ARGV[1], ARGV[2]
local declared = {}
for _, key in ipairs(KEYS) do
  declared[key] = true
end
local function starts(text, prefix)
  return string.sub(text, 1, #prefix) == prefix
end
local function hex(bytes)  -- one format call, not one per byte: this runs for every pack a script reads
  return string.format(string.rep('%02x', #bytes), string.byte(bytes, 1, -1))
end
-- The base a pack was compressed against (layer bit 4; 12-byte id when linked, bit 8, else 16), or nil.
local function base_of(head)
  local layers = string.byte(head, 9)
  if layers == nil or math.floor(layers / 4) % 2 ~= 1 then
    return nil
  end
  local size = (math.floor(layers / 8) % 2 == 1) and 12 or 16
  if #head < 9 + size then
    return nil
  end
  return hex(string.sub(head, 10, 9 + size))
end

local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'zset' then
  return {'WRONGTYPE', KEYS[1]}
end
local changed = {'CHANGED'}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if not declared[cp_prefix .. id] and #changed <= 1000 then
    changed[#changed + 1] = id
  end
end
if #changed > 1 then
  return changed
end

local needed, undeclared = {}, {'UNDECLARED'}
for i = 2, #KEYS do
  local key = KEYS[i]
  if starts(key, cp_prefix) then
    local kind = redis.call('TYPE', key)['ok']
    if kind ~= 'none' and kind ~= 'hash' then
      return {'WRONGTYPE', key}
    end
    for id in string.gmatch(redis.call('HGET', key, 'pk') or '', '[^,]+') do
      local pack = pack_prefix .. id
      while pack and not needed[pack] do
        if not declared[pack] then
          undeclared[#undeclared + 1] = pack
          break
        end
        needed[pack] = true
        local pt = redis.call('TYPE', pack)['ok']
        if pt ~= 'string' then
          if pt ~= 'none' then
            return {'WRONGTYPE', pack}
          end
          break
        end
        local base = base_of(redis.call('GETRANGE', pack, 0, 24))
        pack = base and pack_prefix .. base
      end
    end
  end
end
if #undeclared > 1 then
  return undeclared
end

local doomed = {}
for i = 3, #ARGV do
  local key = pack_prefix .. ARGV[i]
  if declared[key] and not needed[key] then
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'string' then
      doomed[#doomed + 1] = {ARGV[i], key}
    elseif kind ~= 'none' then
      return {'WRONGTYPE', key}
    end
  end
end
local removed = {'OK'}
for _, d in ipairs(doomed) do
  removed[#removed + 1] = d[1]
  removed[#removed + 1] = redis.call('STRLEN', d[2])
  redis.call('DEL', d[2])
end
return removed
