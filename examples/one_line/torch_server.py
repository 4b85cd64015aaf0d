import sys

import octopusd

if __name__ == "__main__":
    sys.exit(octopusd.run_hierarchical_cross_silo_server())
