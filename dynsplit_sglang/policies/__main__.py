"""`python -m dynsplit_sglang.policies [POLICY]`: the policy tables (see tables.py)."""

import argparse

from dynsplit_sglang.policies import POLICY_CLASSES
from dynsplit_sglang.policies.tables import options_table, readme_block

parser = argparse.ArgumentParser(prog="python -m dynsplit_sglang.policies", description=__doc__)
parser.add_argument("policy", nargs="?", choices=list(POLICY_CLASSES), help="print this policy's option table")
args = parser.parse_args()
print(options_table(args.policy) if args.policy else readme_block())
