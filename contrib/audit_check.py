#!/usr/bin/env python3
"""Checks cairn's audit log with nothing of cairn's code: SHA-256 (hashlib) and Ed25519 (cryptography).

  audit_check.py URL TOKEN EVENT_ID [--from SIZE | --old-head FILE] [--key KEY_ID=PUBLIC_HEX]

1. the audit keys from URL/.well-known/audit-keys.json (or the pinned --key);
2. the latest signed head, its signature over the documented message;
3. EVENT_ID's inclusion proof: SHA-256(0x00 || canonical) up the path (RFC 9162 2.1.3.2) to the signed root;
4. with --from SIZE (a signed size) or --old-head FILE (a head saved earlier): the consistency proof
   from that head to the latest (RFC 9162 2.1.4.2), both heads signed.
Exits 0 when everything checks, 1 with the reason when anything does not."""
import hashlib, json, sys, urllib.error, urllib.request
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

def fail(why): sys.exit(f"FAILED: {why}")
def node(left, right): return hashlib.sha256(b"\x01" + left + right).digest()

def get(base, path, token=None):
    req = urllib.request.Request(base.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try: body = json.load(urllib.request.urlopen(req, timeout=60))
    except urllib.error.HTTPError as e: fail(f"{path}: HTTP {e.code} {e.read().decode(errors='replace')}")
    return body["data"] if "data" in body and "success" in body else body

def check_head(head, keys):
    message = f"cairn-audit-head/v1\n{head['origin']}\n{head['tree_size']}\n{head['root_hash']}\n{head['timestamp_ms']}\n"
    if head["key_id"] not in keys: fail(f"head {head['tree_size']} is signed by unknown key {head['key_id']}")
    try: Ed25519PublicKey.from_public_bytes(keys[head["key_id"]]).verify(bytes.fromhex(head["signature"]), message.encode())
    except Exception: fail(f"the signature of head {head['tree_size']} does not verify")
    return bytes.fromhex(head["root_hash"])

def inclusion_root(leaf, index, size, path):
    if index >= size: fail("leaf index outside the tree")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0: fail("inclusion path too long")
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn: fn, sn = fn >> 1, sn >> 1
        else: r = node(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0: fail("inclusion path too short")
    return r

def consistency_roots(first, second, first_root, path):
    if first == second: return (first_root, first_root) if not path else fail("proof for equal sizes must be empty")
    if not path or first == 0: fail("empty consistency proof")
    if first & (first - 1) == 0: path = [first_root] + path
    fn, sn = first - 1, second - 1
    while fn & 1: fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0: fail("consistency proof too long")
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            while not fn & 1 and fn: fn, sn = fn >> 1, sn >> 1
        else: sr = node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0: fail("consistency proof too short")
    return fr, sr

def main(argv):
    base, token, event_id, opts = argv[0], argv[1], argv[2], dict(zip(argv[3::2], argv[4::2]))
    if "--key" in opts: kid, hexkey = opts["--key"].split("="); keys = {kid: bytes.fromhex(hexkey)}
    else: keys = {k["key_id"]: bytes.fromhex(k["public_key"]) for k in get(base, "/.well-known/audit-keys.json")["keys"]}
    head = get(base, "/api/v1/audit/checkpoints/latest", token)
    root = check_head(head, keys)
    print(f"head: {head['tree_size']} events, root {head['root_hash']}, signed by {head['key_id']} at {head['timestamp']}")
    proof = get(base, f"/api/v1/audit/proof/{event_id}?tree_size={head['tree_size']}", token)
    leaf = hashlib.sha256(b"\x00" + proof["canonical"].encode("utf-8")).digest()
    path = [bytes.fromhex(h) for h in proof["audit_path"]]
    if inclusion_root(leaf, proof["leaf_index"], head["tree_size"], path) != root:
        fail(f"event {event_id}: its bytes as served do not lead to the signed root (leaf {proof['leaf_index']})")
    event = json.loads(proof["canonical"])
    print(f"included: leaf {proof['leaf_index']} = {event['aggregate_type']}/{event['aggregate_id']} #{event['sequence']} "
          f"{event['event_type']} at {event['recorded_at']} by {event['metadata'].get('actor_id', '-')}")
    if "--old-head" in opts or "--from" in opts:
        size = json.load(open(opts["--old-head"]))["tree_size"] if "--old-head" in opts else int(opts["--from"])
        c = get(base, f"/api/v1/audit/consistency?from={size}&to={head['tree_size']}", token)
        old = json.load(open(opts["--old-head"])) if "--old-head" in opts else c["from_head"]
        if not old: fail(f"no signed head of size {size}")
        first_root = check_head(old, keys)
        fr, sr = consistency_roots(size, head["tree_size"], first_root, [bytes.fromhex(h) for h in c["proof"]])
        if fr != first_root or sr != root: fail(f"head {size} is not a prefix of head {head['tree_size']}")
        print(f"consistent: the {size} events of the older head are the first {size} of the latest")
    print("OK")

if __name__ == "__main__":
    if len(sys.argv) < 4: sys.exit(__doc__)
    main(sys.argv[1:])
