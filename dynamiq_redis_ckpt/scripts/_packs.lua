-- _packs.lua: content packs, prepended to every script that reads or counts them (save, load, packs, delete).
--
-- A pack is a string: its reference count as 8 ASCII digits, then its blob, whose first byte names its layers.
-- A linked pack (layer bit 8, format 4) was compressed against a base pack whose 12-byte id follows that byte, and
-- holds one reference on it, so a checkpoint names only the newest pack of a chain. A base's key is the pack's own
-- key with the 24 hex digits of the id replaced: it carries the same flow tag, so it is in the script's slot even
-- though it cannot be declared in KEYS (the pack ids are only known by reading). Redis Cluster serves such keys,
-- except while their slot migrates: Cluster support must walk the chains before the first write and answer a
-- retry when a base is not local (noted for the Cluster work; single-node Redis and Sentinel are unaffected).

local PACK_HEAD = 21  -- count (8), layer byte (1), base id (12)

local function hex(bytes)
  return (string.gsub(bytes, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

-- The id of the base a linked pack holds, from the head of its string; nil for any other pack.
local function linked_base(head)
  local layers = string.byte(head, 9)
  if layers == nil or math.floor(layers / 4) % 4 ~= 3 or #head < PACK_HEAD then  -- based (4) and linked (8)
    return nil
  end
  return hex(string.sub(head, 10, PACK_HEAD))
end

local function base_key(key, id)
  return string.sub(key, 1, -25) .. id
end

-- The key of the base a linked pack holds; nil for any other pack (or a missing one).
local function base_of(key)
  local id = linked_base(redis.call('GETRANGE', key, 0, PACK_HEAD - 1))
  return id and base_key(key, id)
end

-- Adds delta to a pack's reference count. A pack that reaches zero is deleted and lets go of its base, and so on
-- down the chain (no recursion: a run's chain can be thousands of packs long).
local function add_refs(key, delta)
  while key do
    local n = tonumber(redis.call('GETRANGE', key, 0, 7))
    if n == nil then
      return  -- gone (expired): nothing to count
    end
    if n + delta > 0 then
      redis.call('SETRANGE', key, 0, string.format('%08d', n + delta))
      return
    end
    local base = base_of(key)
    redis.call('DEL', key)
    key, delta = base, -1
  end
end

-- Appends {id, pack string or false} to out for every pack of the chains starting at ids, except those in have
-- (whose chains are still walked: a held pack's bases may not be held).
local function gather(prefix, ids, have, out)
  local seen = {}
  for _, id in ipairs(ids) do
    while id and not seen[id] do
      seen[id] = true
      local key = prefix .. id
      if have[id] then
        id = linked_base(redis.call('GETRANGE', key, 0, PACK_HEAD - 1))
      else
        local pack = redis.call('GET', key)
        out[#out + 1] = id
        out[#out + 1] = pack
        id = pack and linked_base(pack)
      end
    end
  end
  return out
end

