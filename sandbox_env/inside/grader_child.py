"""Source text the grader ships to its untrusted child: constants only, nothing runs on import.

The server reads these strings and sends them to the grader (`grading.grader_input`), so it never
executes any of the grader's own code. CODEC is shared by the grader and the child; HOST is the
child's main loop.
"""

# JSON through the C accelerator only: importing `json` (and with it `re`) costs milliseconds in
# each of the two interpreters of every grading. Values travel type-tagged.
CODEC = r'''
import _json, binascii, sys
class _Ctx:
    strict, object_hook, object_pairs_hook, memo = True, None, None, {}
    parse_float, parse_int = float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__
_scan = _json.make_scanner(_Ctx())
def loads(text):
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text): raise ValueError("trailing data after JSON")
    return value
def _no_default(o): raise TypeError("not JSON serializable: %s" % type(o).__name__)
_encode = _json.make_encoder(None, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, True)
def dumps(value): return "".join(_encode(value, 0))
def enc(v):
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str: return v
    if t is list: return {"l": [enc(i) for i in v]}
    if t is tuple: return {"t": [enc(i) for i in v]}
    if t is dict: return {"d": [[enc(k), enc(x)] for k, x in v.items()]}
    if t is set: return {"s": [enc(i) for i in v]}
    if t is frozenset: return {"f": [enc(i) for i in v]}
    if t is bytes: return {"b": binascii.b2a_base64(v, newline=False).decode()}
    return _enc_other(v, t)
def _enc_other(v, t):
    # A subclass travels as its builtin base (Counter -> dict, IntEnum -> int, namedtuple ->
    # tuple), read through the base's own C methods: no method of the subclass runs. issubclass
    # on the real type, never isinstance (which trusts a forged __class__).
    if issubclass(t, int): return int.__index__(v)
    if issubclass(t, float): return float.__float__(v)
    if issubclass(t, str): return str.__str__(v)
    if issubclass(t, list): return {"l": [enc(i) for i in list.__iter__(v)]}
    if issubclass(t, tuple): return {"t": [enc(i) for i in tuple.__iter__(v)]}
    if issubclass(t, dict): return {"d": [[enc(k), enc(x)] for k, x in dict.items(v)]}
    if issubclass(t, frozenset): return {"f": [enc(i) for i in frozenset.__iter__(v)]}
    if issubclass(t, set): return {"s": [enc(i) for i in set.__iter__(v)]}
    if issubclass(t, bytes): return {"b": binascii.b2a_base64(bytes.__bytes__(v), newline=False).decode()}
    m = sys.modules.get("decimal")
    if m is not None and t is m.Decimal: return {"D": m.Decimal.__str__(v)}
    m = sys.modules.get("fractions")
    if m is not None and t is m.Fraction: return {"Q": [int.__index__(v.numerator), int.__index__(v.denominator)]}
    raise TypeError("cannot pass a %s between the grader and the submission (plain builtin data only)" % t.__name__)
def dec(x, depth=0):
    if depth > 200: raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str: return x
    if t is dict and len(x) == 1:
        (k, v), = x.items()
        if k == "b" and type(v) is str: return binascii.a2b_base64(v, strict_mode=True)
        if k == "D" and type(v) is str and len(v) < 10000: return __import__("decimal").Decimal(v)
        if k == "Q" and type(v) is list and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
            return __import__("fractions").Fraction(v[0], v[1])
        if type(v) is list:
            items = [dec(i, depth + 1) for i in v] if k != "d" else None
            if k == "l": return items
            if k == "t": return tuple(items)
            if k == "s": return set(items)
            if k == "f": return frozenset(items)
            if k == "d":
                out = {}
                for pair in v:
                    if type(pair) is not list or len(pair) != 2: raise ValueError("bad dict item")
                    out[dec(pair[0], depth + 1)] = dec(pair[1], depth + 1)
                return out
    raise ValueError("undecodable value from the submission")
'''

# The untrusted side: loads the submission, then answers calls with type-tagged JSON. argv: the
# request and reply fds, its scratch folder (cwd, HOME and TMPDIR), the grader's sys.path.
HOST = r'''
import os, sys, types, struct
R, W = int(sys.argv[1]), int(sys.argv[2])
os.chdir(sys.argv[3])
sys.path[:] = sys.argv[4].split(os.pathsep)  # the grader's own path: no `site` import here (-S)
def rd(n):
    b = b""
    while len(b) < n:
        c = os.read(R, n - len(b))
        if not c: os._exit(0)
        b += c
    return b
def recv(): return loads(rd(struct.unpack(">I", rd(4))[0]).decode())
def send(o):
    d = dumps(o).encode(); d = struct.pack(">I", len(d)) + d
    while d: d = d[os.write(W, d):]
def changed(args, sent):
    # arguments the call mutated in place travel back, so the grader's copies change too
    out = []
    for i, a in enumerate(args):
        if type(a) is list or type(a) is dict or type(a) is set:
            e = enc(a)
            if e != sent[i]: out.append([i, e])
    return out
try:
    with open("/proc/self/oom_score_adj", "w") as f: f.write("1000")
except OSError: pass
job = recv()
mod = types.ModuleType("__main__"); sys.modules["__main__"] = mod
try:
    exec(compile(job["source"], "<submission>", "exec", dont_inherit=True), mod.__dict__)
except BaseException as e:
    send({"error": [type(e).__name__, str(e)[:2000]]}); os._exit(0)
names = {"functions": [], "modules": {}, "values": {}}
for k, v in list(mod.__dict__.items()):
    if k.startswith("__"): continue
    if isinstance(v, types.ModuleType): names["modules"][k] = v.__name__
    elif callable(v): names["functions"].append(k)
    else:
        try: names["values"][k] = enc(v)
        except Exception: pass
send({"ok": names})
while True:
    req = recv()
    try:
        fn = mod.__dict__[req["name"]]
        args = dec(req["args"])
        value = fn(*args, **dec(req["kwargs"]))
    except BaseException as e:
        try: reply = {"error": [type(e).__name__, str(e)[:2000]]}
        except BaseException: reply = {"error": ["Exception", "<unprintable>"]}
    else:
        try:
            reply = {"value": enc(value)}
            mutated = changed(args, req["args"]["l"])
            if mutated: reply["args"] = mutated
        except BaseException as e: reply = {"unserializable": str(e)[:2000]}
    send(reply)
'''
