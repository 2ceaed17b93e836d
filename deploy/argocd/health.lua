-- Argo CD health check for openstack.waldur.com/ServerGroup (Lua 5.1, as gopher-lua runs it).
-- Argo CD sets the global `obj` to the live object; the script returns {status, message}.
--   Suspended   Synced=False with reason Paused (the openstack.waldur.com/paused annotation)
--   Progressing no status yet, a status or Ready condition older than metadata.generation,
--               or Ready not True for a transitional reason (Creating, Updating, Deleting, Unknown)
--   Degraded    Stalled=True: nothing will change without a change of spec or of Waldur
--               (InvalidSpec, AlreadyManaged, NotFound of an imported group, Erred once its
--               recovery pulls failed); the same objects kstatus (Flux) reports as Failed
--   Healthy     Ready=True for the current generation
local hs = {}

local function find_condition(conditions, kind)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(conditions) do
    if type(c) == "table" and c.type == kind then
      return c
    end
  end
  return nil
end

-- "reason: message", or whichever of the two is there.
local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  elseif message ~= "" then
    return message
  elseif reason ~= "" then
    return reason
  end
  return fallback
end

local function is_stale(observed, generation)
  return generation ~= nil and (observed == nil or observed < generation)
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a status"
  return hs
end

local ready = find_condition(status.conditions, "Ready")
local synced = find_condition(status.conditions, "Synced")

if synced ~= nil and synced.status == "False" and synced.reason == "Paused" then
  hs.status = "Suspended"
  hs.message = describe(synced, "Paused")
  return hs
end

if is_stale(status.observedGeneration, generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

if ready.observedGeneration ~= nil and is_stale(ready.observedGeneration, generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition of generation " .. tostring(generation)
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  if ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  else
    hs.message = "Ready"
  end
  return hs
end

local stalled = find_condition(status.conditions, "Stalled")
if ready.status ~= "True" and stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

-- Creating, Updating, Deleting, Unknown, Erred while Waldur's recovery still has a chance, or
-- a reason this check does not know: still moving.
-- Say so when the last reconcile failed (Synced=False), since that is what holds it up.
hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the ServerGroup to become Ready")
if synced ~= nil and synced.status == "False" then
  hs.message = hs.message .. " (Synced: " .. describe(synced, "False") .. ")"
end
return hs
