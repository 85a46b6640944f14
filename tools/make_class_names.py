#!/usr/bin/env python3
"""Regenerate assets/imagenet_classes.txt from the data files shipped in the timm wheel.

timm/data/_info/imagenet_synsets.txt          1000 WordNet synset ids in ImageNet-1k class-index order
timm/data/_info/imagenet_synset_to_lemma.txt  tab-separated "synset<TAB>lemmas" (WordNet lemmas)

Output: one line per class, in class-index order, with the comma-separated WordNet lemmas
(the classic "tabby, tabby cat" labels). UTF-8, '\n' line endings, trailing newline.

Usage:  python tools/make_class_names.py [--out assets/imagenet_classes.txt]
"""
import argparse
import csv
import pkgutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _read(name):
    data = pkgutil.get_data('timm.data', f'_info/{name}')
    if data is None:
        raise FileNotFoundError(f'timm/data/_info/{name} not found in the installed timm')
    return data.decode('utf-8')


def class_names():
    synsets = [line.strip() for line in _read('imagenet_synsets.txt').splitlines() if line.strip()]
    lemmas = dict(csv.reader(_read('imagenet_synset_to_lemma.txt').splitlines(), delimiter='\t'))
    assert len(synsets) == 1000 and len(set(synsets)) == 1000, len(synsets)
    names = [lemmas[s].strip() for s in synsets]
    assert names[0] == 'tench, Tinca tinca', names[0]
    assert names[281] == 'tabby, tabby cat', names[281]
    assert all(n and '\n' not in n and '\t' not in n for n in names)
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', type=Path, default=REPO_ROOT / 'assets' / 'imagenet_classes.txt')
    args = ap.parse_args()
    names = class_names()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, 'w', encoding='utf-8', newline='\n') as f:
        f.write('\n'.join(names) + '\n')
    print(f'wrote {len(names)} class names to {args.out}')


if __name__ == '__main__':
    main()
