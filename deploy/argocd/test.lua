-- Runs health.lua on every testdata/*.json sample and compares {status, message} with the
-- sample's "expected". Lua 5.1 to 5.4 (Argo CD's gopher-lua is 5.1):
--   lua5.1 deploy/argocd/test.lua [sample.json ...]
-- Prints one line per case and ends with "N passed, M failed"; exits 1 if any failed.

local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."

---------------------------------------------------------------------------------------------
-- A small JSON decoder: objects, arrays, strings (with \uXXXX escapes), numbers, true, false,
-- null (decoded as nil, as Argo CD's own JSON-to-Lua conversion does).
local json = {}

local function decode_error(s, i, what)
  local line = 1
  for _ in s:sub(1, i):gmatch("\n") do
    line = line + 1
  end
  error(string.format("JSON: %s at line %d (offset %d)", what, line, i), 0)
end

local function skip_ws(s, i)
  local _, e = s:find("^[ \t\r\n]*", i)
  return e + 1
end

local function utf8_char(cp)
  if cp < 0x80 then
    return string.char(cp)
  elseif cp < 0x800 then
    return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40)
  elseif cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40,
      0x80 + cp % 0x40)
  end
  return string.char(0xF0 + math.floor(cp / 0x40000), 0x80 + math.floor(cp / 0x1000) % 0x40,
    0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
  r = "\r", t = "\t" }

local decode_value

local function decode_string(s, i)
  -- s:sub(i, i) is the opening quote
  local parts = {}
  local j = i + 1
  while true do
    local c = s:sub(j, j)
    if c == "" then
      decode_error(s, i, "unterminated string")
    elseif c == '"' then
      return table.concat(parts), j + 1
    elseif c == "\\" then
      local e = s:sub(j + 1, j + 1)
      if e == "u" then
        local hex = s:sub(j + 2, j + 5)
        if not hex:match("^%x%x%x%x$") then
          decode_error(s, j, "bad \\u escape")
        end
        local cp = tonumber(hex, 16)
        j = j + 6
        if cp >= 0xD800 and cp <= 0xDBFF and s:sub(j, j + 1) == "\\u" then
          local low = tonumber(s:sub(j + 2, j + 5), 16)
          if low and low >= 0xDC00 and low <= 0xDFFF then
            cp = 0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00)
            j = j + 6
          end
        end
        parts[#parts + 1] = utf8_char(cp)
      elseif ESCAPES[e] then
        parts[#parts + 1] = ESCAPES[e]
        j = j + 2
      else
        decode_error(s, j, "bad escape")
      end
    else
      local k = s:find('["\\]', j)
      if not k then
        decode_error(s, i, "unterminated string")
      end
      parts[#parts + 1] = s:sub(j, k - 1)
      j = k
    end
  end
end

local function decode_object(s, i)
  local result = {}
  i = skip_ws(s, i + 1)
  if s:sub(i, i) == "}" then
    return result, i + 1
  end
  while true do
    if s:sub(i, i) ~= '"' then
      decode_error(s, i, "expected a string key")
    end
    local k
    k, i = decode_string(s, i)
    i = skip_ws(s, i)
    if s:sub(i, i) ~= ":" then
      decode_error(s, i, "expected ':'")
    end
    local v
    v, i = decode_value(s, skip_ws(s, i + 1))
    result[k] = v
    i = skip_ws(s, i)
    local c = s:sub(i, i)
    if c == "}" then
      return result, i + 1
    elseif c ~= "," then
      decode_error(s, i, "expected ',' or '}'")
    end
    i = skip_ws(s, i + 1)
  end
end

local function decode_array(s, i)
  local result = {}
  local n = 0
  i = skip_ws(s, i + 1)
  if s:sub(i, i) == "]" then
    return result, i + 1
  end
  while true do
    local v
    v, i = decode_value(s, i)
    n = n + 1
    result[n] = v
    i = skip_ws(s, i)
    local c = s:sub(i, i)
    if c == "]" then
      return result, i + 1
    elseif c ~= "," then
      decode_error(s, i, "expected ',' or ']'")
    end
    i = skip_ws(s, i + 1)
  end
end

decode_value = function(s, i)
  i = skip_ws(s, i)
  local c = s:sub(i, i)
  if c == "{" then
    return decode_object(s, i)
  elseif c == "[" then
    return decode_array(s, i)
  elseif c == '"' then
    return decode_string(s, i)
  elseif s:sub(i, i + 3) == "true" then
    return true, i + 4
  elseif s:sub(i, i + 4) == "false" then
    return false, i + 5
  elseif s:sub(i, i + 3) == "null" then
    return nil, i + 4
  end
  local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
  if num and num ~= "" and tonumber(num) then
    return tonumber(num), i + #num
  end
  decode_error(s, i, "unexpected character '" .. c .. "'")
end

function json.decode(s)
  local v, i = decode_value(s, 1)
  i = skip_ws(s, i)
  if i <= #s then
    decode_error(s, i, "trailing characters")
  end
  return v
end

---------------------------------------------------------------------------------------------

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then
    error(err, 0)
  end
  local text = f:read("*a")
  f:close()
  return text
end

local function sample_files()
  if arg and #arg > 0 then
    local files = {}
    for i = 1, #arg do
      files[i] = arg[i]
    end
    return files
  end
  local files = {}
  local p = io.popen('ls "' .. dir .. '/testdata"')
  for name in p:lines() do
    if name:match("%.json$") then
      files[#files + 1] = dir .. "/testdata/" .. name
    end
  end
  p:close()
  return files
end

local check, load_err = loadfile(dir .. "/health.lua")
if not check then
  print("cannot load health.lua: " .. tostring(load_err))
  print("0 passed, 1 failed")
  os.exit(1)
end

local passed, failed = 0, 0
local files = sample_files()
if #files == 0 then
  print("no samples found in " .. dir .. "/testdata")
  print("0 passed, 1 failed")
  os.exit(1)
end

print(string.format("health.lua on %s", _VERSION))
for _, path in ipairs(files) do
  local name = path:match("([^/]+)%.json$") or path
  local ok, result = pcall(function()
    local sample = json.decode(read_file(path))
    obj = sample.object -- Argo CD hands the script the live object as the global `obj`
    local hs = check()
    return { sample = sample, hs = hs }
  end)
  if not ok then
    failed = failed + 1
    print(string.format("FAIL %-30s error: %s", name, tostring(result)))
  else
    local want, got = result.sample.expected, result.hs or {}
    -- A sample without an expected message (the e2e test's live objects) checks the status.
    if got.status == want.status and (want.message == nil or got.message == want.message) then
      passed = passed + 1
      print(string.format("ok   %-30s %-11s %s", name, got.status, got.message))
    else
      failed = failed + 1
      print(string.format("FAIL %-30s (%s)", name, result.sample.description or ""))
      print(string.format("       want %s: %s", tostring(want.status), tostring(want.message)))
      print(string.format("       got  %s: %s", tostring(got.status), tostring(got.message)))
    end
  end
end

print(string.format("%d passed, %d failed", passed, failed))
if failed > 0 then
  os.exit(1)
end
