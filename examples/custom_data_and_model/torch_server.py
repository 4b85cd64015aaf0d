import sys

import octopusd
from my_task import Blobs, build_model

if __name__ == "__main__":
    args = octopusd.init()
    device = octopusd.device.get_device(args)
    test_data = Blobs(n=400, seed=999)             # the server evaluates on its own test set
    model = build_model(args.common.random_seed)
    sys.exit(octopusd.Server(args, device, test_data, model).run())
