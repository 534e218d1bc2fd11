"""Registers a servicer on a grpc.aio server from its service descriptor, so that bytes that are
not a valid request message get INVALID_ARGUMENT (gRPC's own deserializer failure is UNKNOWN), and
methods the servicer does not implement get a plain UNIMPLEMENTED that names them."""

from __future__ import annotations

import inspect

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from fuseloop.rpc_decoding import Malformed, safe_deserializer


def _unary_request(impl, server_streaming: bool):
    if server_streaming:
        async def handler(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for item in impl(request, context):
                yield item
    elif inspect.iscoroutinefunction(impl):
        async def handler(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await impl(request, context)
    else:
        async def handler(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            result = impl(request, context)
            return await result if inspect.isawaitable(result) else result
    return handler


def _unimplemented(name: str, server_streaming: bool):
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server")

    if server_streaming:
        async def handler(request, context):
            await abort(request, context)
            yield  # pragma: no cover - makes this an async generator
        return handler
    return abort


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, base: type) -> None:
    """`base` is the generated *Servicer class: methods not overridden are answered UNIMPLEMENTED."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        implemented = getattr(type(servicer), method.name) is not getattr(base, method.name)
        streaming_in, streaming_out = method.client_streaming, method.server_streaming
        name = f"{service.full_name}/{method.name}"
        if streaming_in:
            if implemented:
                raise NotImplementedError(f"{name}: client-streaming methods are not wired here")
            factory = grpc.stream_stream_rpc_method_handler if streaming_out else grpc.stream_unary_rpc_method_handler

            async def drain(requests, context, _name=name):
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{_name} is not supported by this server")

            handlers[method.name] = factory(drain, request_deserializer=request_class.FromString,
                                            response_serializer=response_class.SerializeToString)
            continue
        factory = grpc.unary_stream_rpc_method_handler if streaming_out else grpc.unary_unary_rpc_method_handler
        handler = _unary_request(impl, streaming_out) if implemented else _unimplemented(name, streaming_out)
        handlers[method.name] = factory(handler, request_deserializer=safe_deserializer(request_class),
                                        response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
