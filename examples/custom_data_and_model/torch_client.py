import sys

import octopusd
from my_task import Blobs, build_model

if __name__ == "__main__":
    args = octopusd.init()
    device = octopusd.device.get_device(args)
    train_data = Blobs(n=300, seed=100 + args.rank)  # this silo's own data
    model = build_model(args.common.random_seed)
    # The same script runs as silo master and, under torchrun, as each trainer rank.
    sys.exit(octopusd.Client(args, device, train_data, model).run())
