import sys

import octopusd
from octopusd import Client

if __name__ == "__main__":
    args = octopusd.init()
    device = octopusd.device.get_device(args)
    dataset, output_dim = octopusd.data.load(args)
    model = octopusd.model.create(args, output_dim)
    sys.exit(Client(args, device, dataset, model).run())
