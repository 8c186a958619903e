"""Ed25519 identities of the parties of a run, and signed JSON records.

Every party holds its secret key in its own private storage (never the bucket).
A key folder holds `<name>.key` (PKCS#8 PEM, mode 0600) and `<name>.pub`; names
are `aggregator` and `silo_<id>`. A silo also has an X25519 key pair,
`<name>.x25519.key` and `<name>.x25519.pub`, for secure aggregation's pairwise
masks (fedpt/secagg.py); a run with `federation.secure_aggregation` lists those
public keys in run.json as `public_keys.x25519`. The aggregator's folder also holds every
silo's `.pub`, and each silo's folder holds `aggregator.pub`, exchanged out of
band: that pinned aggregator key is what makes run.json itself trustworthy.

A signature covers the canonical JSON of a record without its `signature`
field (sorted keys, no whitespace), so any change to any field breaks it.
"""
import base64
import hashlib
import json
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import x25519

from fedpt import errors

SIGNATURE = 'signature'
AGGREGATOR = 'aggregator'
X25519 = 'x25519'  # The key-file infix and run.json's `public_keys` entry of the mask keys.


class KeyFileError(errors.UserError, ValueError):
  """A missing, unreadable or mismatched key; the message names the file and the fix."""


def silo_key_name(silo_id: str) -> str:
  return f'silo_{silo_id}'


def canonical(record: dict) -> bytes:
  body = {k: v for k, v in record.items() if k != SIGNATURE}
  return json.dumps(body, sort_keys=True, separators=(',', ':'), ensure_ascii=True).encode()


def sign(record: dict, secret_key: ed25519.Ed25519PrivateKey) -> dict:
  """The record with a signature over its canonical form."""
  signature = secret_key.sign(canonical(record))
  return {**record, SIGNATURE: base64.b64encode(signature).decode()}


def check_signature(record: dict, public_pem: str) -> str | None:
  """Why `record` is not signed by the key `public_pem`, or None if it is."""
  signature = record.get(SIGNATURE)
  if not signature:
    return 'missing signature'
  try:
    public_key = serialization.load_pem_public_key(public_pem.encode())
    public_key.verify(base64.b64decode(signature, validate=True), canonical(record))
  except (InvalidSignature, ValueError, TypeError):
    return 'bad signature (not made by the expected key, or the record was modified)'
  return None


def public_pem(secret_key: ed25519.Ed25519PrivateKey) -> str:
  return secret_key.public_key().public_bytes(
      serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(public_pem_text: str) -> str:
  """sha256:<hex> of a public key's raw bytes: what two parties compare out of band."""
  key = serialization.load_pem_public_key(public_pem_text.encode())
  raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
  return 'sha256:' + hashlib.sha256(raw).hexdigest()


def generate(keys_dir: str, name: str) -> str:
  """Writes a new key pair `<name>.key` (0600) and `<name>.pub`; never overwrites one.

  A silo's X25519 pair (`<name>.x25519.key`, `.pub`) is written beside it; a silo whose
  Ed25519 pair exists gets only the missing X25519 pair. Returns the first .pub written.
  """
  keys_dir = os.path.expanduser(keys_dir)
  os.makedirs(keys_dir, mode=0o700, exist_ok=True)
  kinds = [(name, ed25519.Ed25519PrivateKey)]
  if name != AGGREGATOR:
    kinds.append((f'{name}.{X25519}', x25519.X25519PrivateKey))
  missing = []
  for stem, kind in kinds:
    paths = [os.path.join(keys_dir, f'{stem}.{ext}') for ext in ('key', 'pub')]
    found = [p for p in paths if os.path.exists(p)]
    if len(found) == 1 or (found and stem == kinds[-1][0]):
      raise KeyFileError(f'{found[0]} already exists; keys are never overwritten. Fix: use it, '
                         'or move it away on purpose and generate again.')
    if not found:
      missing.append((stem, kind))
  for stem, kind in missing:
    secret_key = kind.generate()
    pem = secret_key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    fd = os.open(os.path.join(keys_dir, f'{stem}.key'), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 0o600)
    with os.fdopen(fd, 'wb') as f:
      f.write(pem)
    with open(os.path.join(keys_dir, f'{stem}.pub'), 'w', encoding='ascii') as f:
      f.write(public_pem(secret_key))
  return os.path.join(keys_dir, f'{missing[0][0]}.pub')


def generate_named(keys_dir: str, names) -> list[str]:
  """Key pairs for several parties; checks every name before writing any file."""
  if not names:
    raise KeyFileError('no key name given: nothing to make. Fix: e.g. --names=silo_web (a '
                       'silo) or --names=aggregator (the operator)')
  for name in names:
    if name != AGGREGATOR and not (name.startswith('silo_') and len(name) > len('silo_')):
      raise KeyFileError(f'key name {name!r} is neither "aggregator" nor "silo_<id>". Fix: '
                         'e.g. --names=aggregator,silo_web')
  return [generate(keys_dir, name) for name in names]


def load_secret(keys_dir: str, name: str, kind=ed25519.Ed25519PrivateKey):
  """`<name>.key` of `keys_dir`: an Ed25519 key, or of `kind` (X25519: `<silo>.x25519`)."""
  keys_dir = os.path.expanduser(keys_dir)
  path = os.path.join(keys_dir, f'{name}.key')
  try:
    with open(path, 'rb') as f:
      key = serialization.load_pem_private_key(f.read(), password=None)
  except FileNotFoundError:
    raise KeyFileError(
        f'secret key {path} not found. Fix: create it with scripts/keys.py --keys={keys_dir} '
        f'--names={name.split(".")[0]}, or pass the --keys folder that holds it.') from None
  except (ValueError, TypeError) as e:
    raise KeyFileError(f'{path} is not a PEM private key ({e}). Fix: regenerate it with '
                       'scripts/keys.py.') from None
  if not isinstance(key, kind):
    raise KeyFileError(f'{path} is not an {_KIND_NAMES[kind]} key. Fix: generate one with '
                       'scripts/keys.py.')
  return key


_KIND_NAMES = {ed25519.Ed25519PrivateKey: 'Ed25519', x25519.X25519PrivateKey: 'X25519',
               ed25519.Ed25519PublicKey: 'Ed25519', x25519.X25519PublicKey: 'X25519'}


def load_public(keys_dir: str, name: str, kind=ed25519.Ed25519PublicKey) -> str:
  keys_dir = os.path.expanduser(keys_dir)
  path = os.path.join(keys_dir, f'{name}.pub')
  try:
    with open(path, encoding='ascii') as f:
      pem = f.read()
    key = serialization.load_pem_public_key(pem.encode())
  except FileNotFoundError:
    raise KeyFileError(
        f'public key {path} not found. Fix: copy {name}.pub from its owner into {keys_dir} '
        f'(its owner makes it with scripts/keys.py --keys=<its folder> '
        f'--names={name.split(".")[0]}).') from None
  except (ValueError, UnicodeDecodeError) as e:
    raise KeyFileError(f'{path} is not a PEM public key ({e}). Fix: ask its owner for the '
                       'file written by scripts/keys.py.') from None
  if not isinstance(key, kind):
    raise KeyFileError(f'{path} is not an {_KIND_NAMES[kind]} public key. Fix: use '
                       'scripts/keys.py.')
  return pem


def x25519_name(silo_id: str) -> str:
  """The key-file stem of silo `silo_id`'s X25519 (mask) key pair."""
  return f'{silo_key_name(silo_id)}.{X25519}'


def run_public_keys(keys_dir: str, silo_ids, secure_aggregation: bool = False) -> dict:
  """The `public_keys` entry of run.json, from the aggregator operator's key folder.

  With secure aggregation it lists every silo's X25519 key too (`x25519`). Every
  missing .pub is named at once: collecting them is a round trip to each party.
  """
  names = [AGGREGATOR, *(silo_key_name(s) for s in silo_ids)]
  if secure_aggregation:
    names += [x25519_name(s) for s in silo_ids]
  missing = [n for n in names
             if not os.path.exists(os.path.join(os.path.expanduser(keys_dir), f'{n}.pub'))]
  if missing:
    raise KeyFileError(
        f'{len(missing)} public key(s) missing from {keys_dir}: '
        f'{", ".join(f"{n}.pub" for n in missing)}. Fix: each party makes its own key pair '
        '(scripts/keys.py --keys=<its private folder> --names=<its name>, e.g. '
        f'--names={missing[0].split(".")[0]}) and sends you its .pub; copy them into '
        f'{keys_dir}, then rerun')
  keys = {AGGREGATOR: load_public(keys_dir, AGGREGATOR),
          'silos': {s: load_public(keys_dir, silo_key_name(s)) for s in silo_ids}}
  if secure_aggregation:
    keys[X25519] = {s: load_public(keys_dir, x25519_name(s), x25519.X25519PublicKey)
                    for s in silo_ids}
  return keys


def load_x25519_secret(keys_dir: str, silo_id: str) -> x25519.X25519PrivateKey:
  """Silo `silo_id`'s X25519 secret key (`silo_<id>.x25519.key`), for its pair secrets."""
  return load_secret(keys_dir, x25519_name(silo_id), x25519.X25519PrivateKey)


class Identity:
  """One party's view of a signed run: its own secret key and the run's public keys.

  `run_keys` is run.json's `public_keys`. The constructor checks run.json
  against what this party trusts out of band, so a swapped run.json is caught
  before anything is read or written.
  """

  def __init__(self, keys_dir: str, name: str, run: dict):
    self.name = name
    self.secret = load_secret(keys_dir, name)
    run_keys = run.get('public_keys')
    if not run_keys:
      raise KeyFileError(
          'this run is unsigned (run.json lists no public keys) but --keys was given. Refusing '
          'to join: anyone with write access to the bucket could have replaced run.json. Fix: '
          'create the run with scripts/init_run.py --keys=..., or drop --keys for an unsigned '
          'local experiment.')
    self.run_keys = run_keys
    pinned = load_public(keys_dir, AGGREGATOR)
    if _normalise(pinned) != _normalise(run_keys[AGGREGATOR]):
      raise KeyFileError(
          f'run.json names a different aggregator key than {keys_dir}/aggregator.pub. The run '
          'root holds another run, or run.json was replaced. Fix: check --storage, and the '
          'aggregator.pub you received from the run\'s operator.')
    reason = check_signature(run, run_keys[AGGREGATOR])
    if reason:
      raise KeyFileError(f'run.json: {reason}. Fix: the run root was tampered with; ask the '
                         'operator to recreate the run.')
    own = run_keys[AGGREGATOR] if name == AGGREGATOR else run_keys['silos'].get(
        name[len('silo_'):])
    if own is None or _normalise(own) != _normalise(public_pem(self.secret)):
      raise KeyFileError(
          f'run.json does not list the public key of {keys_dir}/{name}.key for {name}. Fix: '
          f'send {name}.pub to the run\'s operator before the run is created, or pass the '
          '--keys folder with the right key.')

  def sign(self, record: dict) -> dict:
    return sign(record, self.secret)

  def check_silo(self, record: dict, silo_id: str) -> str | None:
    pem = self.run_keys['silos'].get(silo_id)
    if pem is None:
      return 'unknown silo (no public key in run.json)'
    return check_signature(record, pem)

  def check_aggregator(self, record: dict) -> str | None:
    return check_signature(record, self.run_keys[AGGREGATOR])


def listed_aggregator_check(run: dict):
  """Checks records against the aggregator key run.json lists; None for an unsigned run."""
  keys = run.get('public_keys')
  if not keys:
    return None
  return lambda record: check_signature(record, keys[AGGREGATOR])


def listed_silo_check(run: dict):
  """Checks a silo's records against the keys run.json lists; None for an unsigned run."""
  keys = run.get('public_keys')
  if not keys:
    return None

  def check(record: dict, silo_id: str) -> str | None:
    pem = keys['silos'].get(silo_id)
    return 'unknown silo (no public key in run.json)' if pem is None else check_signature(
        record, pem)
  return check


def party_identity(run: dict, keys_dir: str | None, name: str):
  """This party's signing identity in a signed run; None in an unsigned one."""
  if keys_dir:
    return Identity(keys_dir, name, run)
  if run.get('public_keys'):
    raise KeyFileError(
        f'this run is signed (run.json lists public keys): pass --keys, the folder holding '
        f'{name}.key and aggregator.pub. Fix: scripts/keys.py --keys=DIR --names={name} makes '
        f'{name}.key; aggregator.pub comes from the run\'s operator.')
  return None


def _normalise(pem: str) -> str:
  return ''.join(pem.split())
