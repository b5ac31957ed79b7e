-- _packs.lua: content packs, prepended to every script that reads or counts them (save, load, packs, delete).
--
-- A pack is a string: its reference count as 8 ASCII digits, then its blob, whose first byte names its layers.
-- A linked pack (layer bit 8, format 4) was compressed against a base pack whose 12-byte id follows that byte, and
-- holds one reference on it, so a checkpoint names only the newest pack of a chain. A base's key is the pack's own
-- key with the 24 hex digits of the id replaced (same flow tag, same slot).
--
-- Declared keys only: a script touches no key that is not in its KEYS (Redis Cluster checks them while a slot
-- migrates; proxies route and check by them). The caller declares every pack key it expects the script to need:
-- a pack's base is fixed when the pack is made (packs are content-addressed and immutable), so the client remembers
-- the links it has seen and declares whole chains. Before its first write a script does a dry run of its writes
-- (plan_refs, plan_base: the same walks, reading only declared keys); a base (or a named pack) whose key was not
-- declared is collected with need(), and the script then writes nothing and answers
-- {'UNDECLARED', {pack id, base id, ...}, {key, ...}}: the links it learned and the keys it still needs. The caller
-- learns them, reads the chains below with plain GETRANGEs of the pack heads, and sends the script again with the
-- larger KEYS (a warm process knows every link and needs no extra round). load and packs are read only: they answer
-- what they could gather together with the same two lists. The writes themselves (add_refs, base_of) never touch
-- an undeclared key either: after the dry run there is none on their way.

local PACK_HEAD = 21  -- count (8), layer byte (1), base id (12)

local function hex(bytes)  -- one format call, not one per byte: this runs for every pack a script reads
  return string.format(string.rep('%02x', #bytes), string.byte(bytes, 1, -1))
end

-- The id of the base a linked pack holds, from the head of its string; nil for any other pack.
local function linked_base(head)
  local layers = string.byte(head, 9)
  if layers == nil or math.floor(layers / 4) % 4 ~= 3 or #head < PACK_HEAD then  -- based (4) and linked (8)
    return nil
  end
  return hex(string.sub(head, 10, PACK_HEAD))
end

-- The name of a pack's key from another pack key of the flow (a name only: it is touched only once declared).
local function base_key(key, id)
  return string.sub(key, 1, -25) .. id
end

local function id_of(key)
  return string.match(key, '([^:]*)$')
end

local declared = {}
for _, key in ipairs(KEYS) do
  declared[key] = true
end

-- What the script still needs: links learned (pack id, base id, flat) and keys to declare, each once.
local needed_links, needed_keys, needed_seen = {}, {}, {}
local function need(key, pack, base)
  if needed_seen[key] then
    return
  end
  needed_seen[key] = true
  needed_keys[#needed_keys + 1] = key
  if pack then
    needed_links[#needed_links + 1] = pack
    needed_links[#needed_links + 1] = base
  end
end

-- {'UNDECLARED', links, keys} when the walks so far reached an undeclared key; nil when every key was declared.
local function undeclared()
  if #needed_keys == 0 then
    return nil
  end
  return {'UNDECLARED', needed_links, needed_keys}
end

-- A dry run, before the first write, of what the writes will touch (read only, declared keys only). The key of
-- the base a linked pack holds; nil for any other pack, and nil (the key goes to need()) for one not declared.
local planned_base = {}  -- key -> base key, for a pack the script will create (not stored yet)
local function plan_base(key)
  if planned_base[key] ~= nil then
    return planned_base[key] or nil
  end
  local id = linked_base(redis.call('GETRANGE', key, 0, PACK_HEAD - 1))
  if not id then
    return nil
  end
  local base = base_key(key, id)
  if not declared[base] then
    need(base, id_of(key), id)
    return nil
  end
  return base
end

-- The dry run of add_refs: the counts it would leave (false: deleted), kept across calls as the writes would.
local planned_count = {}
local function plan_refs(key, delta)
  while key do
    if not declared[key] then
      need(key)
      return
    end
    if planned_count[key] == nil then
      planned_count[key] = tonumber(redis.call('GETRANGE', key, 0, 7)) or false
    end
    local n = planned_count[key]
    if not n then
      return
    end
    if n + delta > 0 then
      planned_count[key] = n + delta
      return
    end
    planned_count[key] = false
    key, delta = plan_base(key), -1
  end
end

-- The key of the base a linked pack holds; nil for any other pack (or a missing one). The dry run reached every base
-- the writes reach, so it is declared; one that is not (never expected) is left alone, not touched.
local function base_of(key)
  local id = linked_base(redis.call('GETRANGE', key, 0, PACK_HEAD - 1))
  local base = id and base_key(key, id)
  return base and declared[base] and base or nil
end

-- Adds delta to a pack's reference count. A pack that reaches zero is deleted and lets go of its base, and so on
-- down the chain (no recursion: a run's chain can be long).
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
-- (whose chains are still walked: a held pack's bases may not be held). A pack whose key was not declared is not
-- read: it goes to need() (with the link that named it), and the walk of that chain stops there.
local function gather(prefix, ids, have, out)
  local seen = {}
  for _, id in ipairs(ids) do
    local from = nil
    while id and not seen[id] do
      seen[id] = true
      local key = prefix .. id
      if not declared[key] then
        if from then
          need(key, from, id)
        else
          need(key)
        end
        break
      end
      from = id
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
