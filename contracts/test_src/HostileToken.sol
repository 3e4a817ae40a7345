// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title A misbehaving ERC-20, for tests only
/// @notice Once armed, every transfer into or out of `target` calls `target` back with `payload` while the
///         target is still inside its own function: the reentrancy a malicious token would try. The outcome
///         of that call is recorded (`bubble` false) or becomes the outcome of the transfer (`bubble` true).
///         With `skim` set, each transfer burns that much from the recipient, so it receives less than sent.
contract HostileToken is ERC20 {
    address public target;
    bytes public payload;
    bool public bubble;
    uint256 public skim;
    uint256 public attempts;
    bool public lastCallSucceeded;
    bytes public lastReturnData;
    bool private _attacking;

    constructor() ERC20("Hostile", "HSTL") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function arm(address target_, bytes calldata payload_, bool bubble_) external {
        target = target_;
        payload = payload_;
        bubble = bubble_;
    }

    function disarm() external {
        target = address(0);
    }

    function setSkim(uint256 skim_) external {
        skim = skim_;
    }

    /// @notice Lets this contract act as a party itself: approve a spender of its own balance.
    function approveFromSelf(address spender, uint256 amount) external {
        _approve(address(this), spender, amount);
    }

    /// @notice Lets this contract act as a party itself: call `to` with `data` as msg.sender.
    function callFromSelf(address to, bytes calldata data) external returns (bytes memory) {
        (bool ok, bytes memory ret) = to.call(data);
        if (!ok) _revertWith(ret);
        return ret;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (skim > 0 && from != address(0) && to != address(0)) super._update(to, address(0), skim);
        if (target == address(0) || _attacking || (from != target && to != target)) return;

        _attacking = true;
        (bool ok, bytes memory ret) = target.call(payload);
        _attacking = false;
        attempts += 1;
        lastCallSucceeded = ok;
        lastReturnData = ret;
        if (!ok && bubble) _revertWith(ret);
    }

    function _revertWith(bytes memory data) private pure {
        assembly ("memory-safe") {
            revert(add(data, 32), mload(data))
        }
    }
}
