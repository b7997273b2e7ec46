"""Regenerates fuzz/seeds/ from the committed fixtures (run from anywhere with the torch venv):

    /work/venvs/fx/bin/python fuzz/make_seeds.py

Seeds stay < 64 KB each: rank checkpoints are re-saved with every tensor cut to one row
(same keys, dtypes and zip root), tar seeds keep the real member names with 24-byte bodies.
"""
import glob, hashlib, io, os, shutil, tarfile, tempfile, zipfile
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHIVES = os.path.join(HERE, '..', 'fixtures', 'archives')
WORK = tempfile.mkdtemp(prefix='fuzz-seeds-')
os.chdir(WORK)
os.makedirs('raw')
for f in sorted(glob.glob(f'{ARCHIVES}/*.nemo')):
    b = os.path.basename(f)[:-5]
    with tarfile.open(f) as t:
        for m in t.getmembers():
            n = m.name[2:].replace('/', '__')
            if not m.isfile() or n.endswith('.zarray') or '.weight__' in n or n.endswith('.distcp'):
                continue
            open(f'raw/{b}__{n}', 'wb').write(t.extractfile(m).read())

S = os.path.join(HERE, 'seeds')
for t in ['pickle', 'tar_index', 'zip_records', 'config_yaml', 'sentencepiece', 'dcp_metadata']:
    shutil.rmtree(f'{S}/{t}', ignore_errors=True)
    os.makedirs(f'{S}/{t}')
seen = set()
def put(target, name, data):
    h = hashlib.sha1(data).hexdigest()
    if (target, h) in seen:
        return
    seen.add((target, h))
    assert len(data) < 64 * 1024, (target, name, len(data))
    open(f'{S}/{target}/{name}', 'wb').write(data)

raw = sorted(glob.glob('raw/*'))
arch = lambda f: os.path.basename(f).split('__')[0]
# config + tokenizers
for f in raw:
    if f.endswith('model_config.yaml'):
        put('config_yaml', arch(f) + '.yaml', open(f, 'rb').read())
    if f.endswith('tokenizer.model'):
        put('sentencepiece', arch(f) + '.model', open(f, 'rb').read())
for f in glob.glob(f'{ARCHIVES}/../tokenizers/*/tokenizer.model'):
    put('sentencepiece', 'fixtures_' + f.split('/')[-2] + '.model', open(f, 'rb').read())

# torch zips: data.pkl records of every rank, whole small zips, shrunk rank checkpoints
zips = [f for f in raw if f.endswith('.ckpt') or f.endswith('.pt')]
for f in zips:
    z = zipfile.ZipFile(f)
    pkl = [n for n in z.namelist() if n.endswith('/data.pkl')][0]
    short = arch(f) + '_' + os.path.basename(f).split('__')[-1].replace('model_weights', 'mw').replace('.ckpt','')[-24:]
    put('pickle', short + '.pkl', z.read(pkl))
    data = open(f, 'rb').read()
    if len(data) < 64 * 1024:
        put('zip_records', short + '.pt', data)
done = set()
for f in zips:
    if not f.endswith('.ckpt'):
        continue
    key = arch(f) + str(os.path.getsize(f))
    if key in done or 'gzip' in f:
        continue
    done.add(key)
    sd = torch.load(f, map_location='cpu', weights_only=False)
    def shrink(o):
        if isinstance(o, torch.Tensor):
            return o.narrow(0, 0, 1).clone() if o.dim() else o.clone()
        if isinstance(o, dict):
            return type(o)((k, shrink(v)) for k, v in o.items())
        return o
    sd = shrink(sd)
    root = os.path.basename(f).split('__')[1] if f.count('__') == 2 else ''
    stem = (root + '_' if root else '') + 'model_weights'
    os.makedirs('tmp', exist_ok=True)
    p = f'tmp/{stem}.ckpt'
    torch.save(sd, p)
    data = open(p, 'rb').read()
    put('zip_records', arch(f) + '_' + stem + '_shrunk.ckpt', data)
    with zipfile.ZipFile(p) as z:
        put('pickle', arch(f) + '_' + stem + '_shrunk.pkl', z.read([n for n in z.namelist() if n.endswith('/data.pkl')][0]))
# one truncated real rank (no central directory) for the error paths
small = min((f for f in zips if f.endswith('.ckpt')), key=os.path.getsize)
put('zip_records', 'truncated_head.ckpt', open(small, 'rb').read()[:16384])
put('zip_records', 'truncated_tail.ckpt', open(small, 'rb').read()[-16384:])

# tar: the real member lists with tiny bodies, in the three header formats
for f in sorted(glob.glob(f'{ARCHIVES}/*.nemo')):
    b = os.path.basename(f)[:-5]
    src = tarfile.open(f)
    for fmt, fname in [(tarfile.USTAR_FORMAT, 'ustar'), (tarfile.GNU_FORMAT, 'gnu'), (tarfile.PAX_FORMAT, 'pax')]:
        if fname != 'ustar' and b not in ('gqa_dist_zarr_bf16', 'legacy_tp2_pp2_bf16'):
            continue
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode='w', format=fmt) as out:
            for m in src.getmembers()[:(25 if fname == 'pax' else 45)]:
                if m.isfile():
                    body = src.extractfile(m).read()[:24]
                    m.size = len(body)
                    out.addfile(m, io.BytesIO(body))
                else:
                    out.addfile(m)
            if fname != 'ustar':
                # long name: GNU 'L' record or PAX 'path' record
                ti = tarfile.TarInfo('./model_weights/' + 'x' * 120 + '/0.0')
                ti.size = 4
                out.addfile(ti, io.BytesIO(b'abcd'))
        data = buf.getvalue()
        if len(data) >= 64 * 1024:
            data = data[:63 * 1024]
        put('tar_index', f'{b}_{fname}.tar', data)
# a real archive head and the gzip one's head
put('tar_index', 'legacy_tp2_bf16_head.nemo', open(f'{ARCHIVES}/legacy_tp2_bf16.nemo', 'rb').read()[:20480])
put('tar_index', 'legacy_tp2_gzip_head.nemo', open(f'{ARCHIVES}/legacy_tp2_gzip.nemo', 'rb').read()[:4096])

# torch_dist: the real .metadata of each archive and the broken variants tests/hostile.rs uses
for f in raw:
    if f.endswith('__.metadata'):
        put('dcp_metadata', f'{arch(f)}.metadata', open(f, 'rb').read())
for f in sorted(glob.glob(os.path.join(HERE, '..', 'fixtures', 'hostile', 'torch_dist', '*.metadata'))):
    put('dcp_metadata', 'hostile_' + os.path.basename(f), open(f, 'rb').read())

shutil.rmtree(WORK)
