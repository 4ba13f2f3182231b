"""moemesh: MoE serving as gRPC microservices."""
